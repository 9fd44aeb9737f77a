"""Layer-by-layer streaming gives exactly the logits of the whole prefill, and observes every linear input."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.reference import run_function
from bitsmith.errors import BitsmithError
from bitsmith.passes.calibrate import initial_envs, linear_inputs, run_samples, run_segment, split_by_layer
from conftest import RANDOM_CONFIGS as CONFIGS, random_model


def test_streamed_segments_equal_full_prefill():
    module, weights = random_model(CONFIGS["qwen3-interleaved"])
    samples = np.random.default_rng(0).integers(0, 40, size=(3, 9))
    segments = split_by_layer(module)
    assert [s.index for s in segments] == [-1, 0, 1, 2, 3]
    seen: dict[str, int] = {}
    envs = initial_envs(module, samples)
    fn = module["prefill"]
    expected_weights = {n for n in weights if n.endswith("proj.weight")} | {"embed_tokens.weight"}
    found_weights = set()
    for seg in segments:
        inputs = linear_inputs(fn, seg)
        found_weights |= set(inputs) & expected_weights
        envs = [run_segment(fn, seg, env, weights, lambda n, x: seen.__setitem__(n, seen.get(n, 0) + x.shape[0]),
                            set(inputs.values())) for env in envs]
    assert found_weights == expected_weights
    # per layer: q/k/v share one input, gate/up share one, o_proj and down_proj have their own; plus the head
    assert len(seen) == 4 * 3 + 1 and set(seen.values()) == {3 * 9}
    for sample, env in zip(samples, envs):
        cache = np.zeros_like(env["kv_cache"])
        expected = run_function(fn, weights, {"tokens": sample, "positions": np.arange(9), "kv_cache": cache})[0]
        np.testing.assert_allclose(env[fn.outputs[0]], expected, rtol=1e-6, atol=1e-6)


def test_samples_on_threads_equal_one_at_a_time():
    """run_samples (2 samples at once, a cache each) gives every sample's outputs exactly, and replays the
    observations in sample order, as the sequential loop makes them."""
    module, weights = random_model(CONFIGS["qwen3-interleaved"])
    samples = np.random.default_rng(1).integers(0, 40, size=(5, 9))
    fn = module["prefill"]
    seq_envs, par_envs = initial_envs(module, samples), initial_envs(module, samples, caches=2)
    seq_seen, par_seen = [], []
    for seg in split_by_layer(module):
        observed = set(linear_inputs(fn, seg).values())
        seq_envs = [run_segment(fn, seg, env, weights, lambda n, x: seq_seen.append((n, x.copy())), observed)
                    for env in seq_envs]
        par_envs = run_samples(fn, seg, par_envs, weights, lambda n, x: par_seen.append((n, x.copy())), observed,
                               threads=2)
    assert [n for n, _ in par_seen] == [n for n, _ in seq_seen]
    for (_, a), (_, b) in zip(par_seen, seq_seen):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(par_envs, seq_envs):
        np.testing.assert_array_equal(a[fn.outputs[0]], b[fn.outputs[0]])
    with pytest.raises(BitsmithError, match="share a KV-cache"):
        shared = initial_envs(module, samples[:3]) + initial_envs(module, samples[:1])  # 2 caches, 0 and 1 share
        run_samples(fn, split_by_layer(module)[0], shared, weights, threads=2)
