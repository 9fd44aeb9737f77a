"""The search's latency model charges a rotated model's online Hadamards: the bytes they move per decode step (each
reads and writes its activation once per sequence, its factor weight once) at the lm_head GEMV's bandwidth."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import RANDOM_CONFIGS, random_model

from bitsmith.passes.assign_precision import linear_weights
from bitsmith.search.cost import LatencyTable, online_rotation_bytes
from bitsmith.search.rotation import rotate_model
from bitsmith.search.run import SearchOptions, build_search_model, plan_stats, step_overhead
from bitsmith.search.sensitivity import Sensitivity


class FixedLatency(LatencyTable):
    """A GEMV takes 1 ns per 16-bit weight byte plus 1 us per call (no kernels built or timed)."""

    def __init__(self) -> None:
        self.path, self.table = None, {}

    def seconds(self, out_f: int, in_f: int, scheme: str, batch: int) -> float:
        return 2e-9 * out_f * in_f + 1e-6


@pytest.mark.parametrize("batch", [1, 4])
def test_rotated_plan_estimate_adds_exactly_the_online_hadamards_bytes(batch):
    cfg = RANDOM_CONFIGS["gqa"]  # 2 layers, q 4 x 8, k 2 x 8, intermediate 40 (= 2 x 20: a dense factor)
    module, weights = random_model(cfg)
    calibration = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 16))
    rotated, rweights = rotate_model(module, weights, "hadamard", 0, calibration)
    factors = rotated.meta["rotation"]["ffn"]["factors"].values()
    factor_bytes = sum(rweights[name].nbytes for name in factors)
    assert factor_bytes > 0  # the down_proj Hadamard reads a factor
    # per layer: q, k and down_proj's input read and written once per sequence in float32, the factor read once
    per_layer = 2 * 4 * batch * (cfg.num_heads * cfg.head_dim + cfg.num_kv_heads * cfg.head_dim
                                 + cfg.intermediate_size) + factor_bytes
    expected_bytes = cfg.num_layers * per_layer
    assert online_rotation_bytes(module, batch) == 0
    assert online_rotation_bytes(rotated, batch) == expected_bytes

    latency, opts = FixedLatency(), SearchOptions(memory=1 << 30, context=64, batch=batch)
    lm_head = (cfg.vocab_size, cfg.hidden_size)
    bandwidth = 2 * cfg.vocab_size * cfg.hidden_size / latency.seconds(*lm_head, "16", 1)
    expected_s = expected_bytes / bandwidth
    plain, turned = step_overhead(module, weights, opts, latency), step_overhead(rotated, rweights, opts, latency)
    assert turned - plain == pytest.approx(expected_s, rel=1e-12) and expected_s > 0
    # a given overhead (run_search's overhead_s) still gets the rotation's term
    assert step_overhead(rotated, rweights, opts, latency, 1e-3) == pytest.approx(1e-3 + expected_s, rel=1e-12)

    # the same plan (every searched tensor at its first choice) on both models: only the overhead differs
    searched = linear_weights(module)
    stats = []
    for mod, w, overhead in ((module, weights, plain), (rotated, rweights, turned)):
        sm = build_search_model(mod, w, opts, Sensitivity({}, {}, 0), latency, tensors=searched)
        stats.append(plan_stats(sm, {t: choices[0] for t, choices in sm.options.items()}, overhead))
    assert stats[1]["latency_pred_ms"] - stats[0]["latency_pred_ms"] == pytest.approx(1e3 * expected_s, rel=1e-9)
