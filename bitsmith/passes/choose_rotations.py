"""choose_rotations: the folded rotations' matrices, R1 over the hidden size and R2 over head_dim (randomized Hadamard)."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ChooseRotations(Pass):
    """ctx.rotations["r1"] = a randomized Hadamard of the hidden size, ["r2"] one of head_dim (different signs).
    Randomized signs matter: a plain Hadamard leaves the first basis direction's mean in one channel."""

    seed: int = 0
    name = "choose_rotations"
    requires = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        hidden, head_dim = rotation_sizes(module, ctx)
        ctx.rotations["r1"] = random_hadamard(hidden, self.seed)
        if head_dim is not None:
            ctx.rotations["r2"] = random_hadamard(head_dim, self.seed + 1)
        return module
