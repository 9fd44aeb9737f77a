"""Layer-by-layer streaming gives exactly the logits of the whole prefill, and observes every linear input."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.reference import run_function
from bitsmith.passes.calibrate import initial_envs, run_segment, split_by_layer
from conftest import RANDOM_CONFIGS as CONFIGS, random_model


def test_streamed_segments_equal_full_prefill():
    module, weights = random_model(CONFIGS["qwen3-interleaved"])
    samples = np.random.default_rng(0).integers(0, 40, size=(3, 9))
    segments = split_by_layer(module)
    assert [s.index for s in segments] == [-1, 0, 1, 2, 3]
    seen: dict[str, int] = {}
    envs = initial_envs(module, samples)
    observed = {n for n in weights if n.endswith("proj.weight")}
    fn = module["prefill"]
    for seg in segments:
        envs = [run_segment(fn, seg, env, weights, lambda n, x: seen.__setitem__(n, seen.get(n, 0) + x.shape[0]),
                            observed) for env in envs]
    assert seen == {name: 3 * 9 for name in observed}
    for sample, env in zip(samples, envs):
        cache = np.zeros_like(env["kv_cache"])
        expected = run_function(fn, weights, {"tokens": sample, "positions": np.arange(9), "kv_cache": cache})[0]
        np.testing.assert_allclose(env[fn.outputs[0]], expected, rtol=1e-6, atol=1e-6)
