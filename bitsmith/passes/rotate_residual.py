"""rotate_residual: fold R1 into the embedding, every linear that reads or writes the residual stream, and the lm_head."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.rotation import check_orthogonal, rotate_columns, rotate_rows
from bitsmith.passes.rotation_sites import with_rotation_meta, find_residual_sites


@dataclass(frozen=True)
class RotateResidual(Pass):
    """The stream x becomes x R1 everywhere: tables E <- E R1, readers W <- W R1, writers W <- R1^T W and
    b <- b R1 (see passes/quant/rotation.py). Unit-scale RMSNorms (fold_norm_scales) commute with R1, so the
    model computes the same logits; what changes is that outlier channels are spread over all of them, which is
    what per-group quantization of the readers' weights (and of their int8 activations) needs."""

    name = "rotate_residual"
    requires = frozenset({"norms_folded"})
    provides = frozenset({"rotated"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        r1 = ctx.rotations.get("r1")
        if r1 is None:
            raise BitsmithError("no R1 matrix chosen", where=f"pass {self.name}",
                                fix="run choose_rotations (or learn_rotations) before it")
        check_orthogonal(r1)
        sites = find_residual_sites(module["prefill"])
        done: set[str] = set()
        for table in sites.embeddings:
            ctx.weights[table] = rotate_columns(ctx.weights[table], r1)  # rows are tokens: E @ R1
            done.add(table)
        for _, linears in sites.norms:
            for lin in linears:
                if lin.weight not in done:  # a tied head is the table, rotated once
                    ctx.weights[lin.weight] = rotate_columns(ctx.weights[lin.weight], r1)
                    done.add(lin.weight)
        head_norm = module.meta.get("rotation", {}).get("head_norm")
        if head_norm is not None:  # read as a reader above (W R1); it also writes the head's rotated input
            ctx.weights[head_norm] = rotate_rows(ctx.weights[head_norm], r1)
        for lin in sites.writers:
            ctx.weights[lin.weight] = rotate_rows(ctx.weights[lin.weight], r1)
            if lin.bias is not None:
                ctx.weights[lin.bias] = rotate_rows(ctx.weights[lin.bias], r1)
        return with_rotation_meta(module, "r1", {"size": int(r1.shape[0]), "orthogonality": check_orthogonal(r1)})
