"""find_outlier_channels: residual channels with massive activations, which rotations leave alone (R1 is I there)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.calibrate import initial_envs, run_samples, split_by_layer
from bitsmith.passes.manager import Pass
from bitsmith.passes.rotation_sites import find_residual_sites, with_rotation_meta

OUTLIER_SAMPLES = 4  # calibration samples measured (one numpy forward each)
MAX_OUTLIER_FRACTION = 1 / 32  # at most this share of the hidden channels (SmolLM2: 18 of 576)


@dataclass(frozen=True)
class FindOutlierChannels(Pass):
    """Why: LLMs grow a few residual channels with "massive activations" (SmolLM2-135M: channel 507 holds 97% of the
    stream's energy at layer 20) whose norm scale is tiny, so every reader nearly ignores them. Folding that scale
    into the readers and rotating spreads the channel's energy over all of them, and the readers' rounding error
    is then multiplied by it: RTN int4 per-channel KLD doubled (0.86 -> 1.63). Rotating only the other channels
    keeps what rotation buys there, and those channels keep their norm scale (fold_norm_scales skips them).

    A channel is an outlier when its mean square, at some norm's input, exceeds `ratio` times the median
    channel's, over OUTLIER_SAMPLES calibration samples; ratio 0 turns this off (every channel is rotated)."""

    ratio: float = 100.0
    name = "find_outlier_channels"
    requires = frozenset({"canonical"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        if self.ratio <= 0:
            ctx.rotations["outliers"] = np.zeros(0, dtype=np.int64)
            return module
        if ctx.calibration is None:
            raise BitsmithError("finding outlier channels needs calibration tokens", where=f"pass {self.name}",
                                fix="compile a model with a tokenizer, or pass --rotate-outliers 0 (rotate every channel)")
        fn = module["prefill"]
        watched = set(find_residual_sites(fn).norm_inputs)
        sums: dict[str, np.ndarray] = {}

        def observe(value: str, x: np.ndarray) -> None:
            sums[value] = sums.get(value, 0) + np.square(x, dtype=np.float64).sum(axis=0)

        envs = initial_envs(module, ctx.calibration[:OUTLIER_SAMPLES], caches=2)
        for seg in split_by_layer(module):
            envs = run_samples(fn, seg, envs, ctx.weights, observe, watched)
        ratios = np.max([s / max(float(np.median(s)), 1e-30) for s in sums.values()], axis=0)
        limit = max(1, int(len(ratios) * MAX_OUTLIER_FRACTION))
        order = np.argsort(-ratios)[:limit]
        outliers = np.sort(order[ratios[order] > self.ratio]).astype(np.int64)
        ctx.rotations["outliers"] = outliers
        return with_rotation_meta(module, "outliers", {"channels": outliers.tolist(), "ratio": self.ratio,
                                                       "largest": round(float(ratios.max()), 1)})
