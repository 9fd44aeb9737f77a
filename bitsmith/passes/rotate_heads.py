"""rotate_heads: fold R2 (head_dim x head_dim) into each value head's v_proj rows and the o_proj columns that read it."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.rotation import check_orthogonal, rotate_head_columns, rotate_head_rows
from bitsmith.passes.rotation_sites import with_rotation_meta, find_head_pairs


@dataclass(frozen=True)
class RotateHeads(Pass):
    """Every value head v_h becomes v_h R2 (v_proj rows of head h <- R2^T W_h); attention mixes values linearly,
    so each query head's output is rotated the same way and o_proj's columns of that head take R2 (W[:, h] R2).
    Exact for grouped-query attention too: all heads share the one R2."""

    name = "rotate_heads"
    requires = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        r2 = ctx.rotations.get("r2")
        pairs = find_head_pairs(module["prefill"])
        if not pairs:
            return module
        if r2 is None or r2.shape[0] != pairs[0].head_dim:
            raise BitsmithError("no R2 matrix of head_dim chosen", where=f"pass {self.name}",
                                fix="run choose_rotations (or learn_rotations) before it")
        check_orthogonal(r2)
        for pair in pairs:
            if pair.v.weight == pair.o.weight:
                raise BitsmithError("v_proj and o_proj share a weight", where=f"pass {self.name}, layer {pair.layer}",
                                    fix="compile without --rotate")
            ctx.weights[pair.v.weight] = rotate_head_rows(ctx.weights[pair.v.weight], r2, pair.kv_heads)
            if pair.v.bias is not None:
                ctx.weights[pair.v.bias] = rotate_head_rows(ctx.weights[pair.v.bias], r2, pair.kv_heads)
            ctx.weights[pair.o.weight] = rotate_head_columns(ctx.weights[pair.o.weight], r2, pair.heads)
        return with_rotation_meta(module, "r2", {"size": int(r2.shape[0])})
