"""Layer-by-layer streaming gives exactly the logits of the whole prefill, and observes every linear input."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.reference import run_function
from bitsmith.passes.calibrate import initial_envs, linear_inputs, run_segment, split_by_layer
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
