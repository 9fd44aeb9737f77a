"""choose_rotations: the folded rotations' matrices, R1 over the hidden size and R2 over head_dim (randomized Hadamard)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.rotation import random_hadamard
from bitsmith.passes.rotation_sites import find_residual_sites


def rotation_sizes(module: Module, ctx: PassContext) -> tuple[int, int | None]:
    """(hidden size, head_dim or None when the model has no attention) from the embedding table and the v/o pairs."""
    sites = find_residual_sites(module["prefill"])
    hidden = ctx.weights.shape(sites.embeddings[0])[1]
    head_dims = {pair.head_dim for pair in sites.heads}
    return hidden, (head_dims.pop() if len(head_dims) == 1 else None)


def residual_rotation(hidden: int, outliers: np.ndarray | None, seed: int) -> np.ndarray:
    """R1: the identity on the outlier channels (find_outlier_channels), a randomized Hadamard on the others.

        x R1 = [ x_outliers | x_rest @ H ]   (channels in their own places: R1[i, i] = 1 for an outlier i)"""
    outliers = np.zeros(0, dtype=np.int64) if outliers is None else outliers
    rest = np.setdiff1d(np.arange(hidden), outliers)
    r1 = np.eye(hidden)
    r1[np.ix_(rest, rest)] = random_hadamard(len(rest), seed)
    return r1


@dataclass(frozen=True)
class ChooseRotations(Pass):
    """ctx.rotations["r1"] = a randomized Hadamard of the hidden size, ["r2"] one of head_dim (different signs).
    Randomized signs matter: a plain Hadamard leaves the first basis direction's mean in one channel."""

    seed: int = 0
    name = "choose_rotations"
    requires = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        hidden, head_dim = rotation_sizes(module, ctx)
        ctx.rotations["r1"] = residual_rotation(hidden, ctx.rotations.get("outliers"), self.seed)
        if head_dim is not None:
            ctx.rotations["r2"] = random_hadamard(head_dim, self.seed + 1)
        return module
