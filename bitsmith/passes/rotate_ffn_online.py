"""rotate_ffn_online: an online Hadamard on each down_proj's input, its columns rotated to match (QuaRot's R4)."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.rotation import online_factor, rotate_columns
from bitsmith.passes.rotation_sites import add_online_factor, find_residual_sites, insert_online_hadamard, with_rotation_meta
from bitsmith.runtime.hadamard import hadamard_matrix_dense


@dataclass(frozen=True)
class RotateFFNOnline(Pass):
    """silu(gate) * up is elementwise, so no weight before down_proj can absorb a rotation of its input: the
    `hadamard` op rotates it at run time (n (log p + m) work per row) and down_proj's columns take the same
    matrix (W <- W H), which spreads the ffn's activation outliers before down_proj's weights are quantized.
    The residual writers that are not o_proj (o_proj has R2) are the ones rotated."""

    seed: int = 0
    name = "rotate_ffn_online"
    requires = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        sites = find_residual_sites(module["prefill"])
        o_weights = {pair.o.weight for pair in sites.heads}
        downs = [lin.weight for lin in sites.writers if lin.weight not in o_weights]
        if not downs:
            return module
        sizes = {ctx.weights.shape(w)[1] for w in downs}
        factors = {}
        for n in sorted(sizes):
            factor = online_factor(n, self.seed)
            module, factors[n] = add_online_factor(module, ctx, factor)
            matrix = hadamard_matrix_dense(n, factor)
            for w in downs:
                if ctx.weights.shape(w)[1] == n:
                    ctx.weights[w] = rotate_columns(ctx.weights[w], matrix)
        functions = {}
        for key, fn in module.functions.items():
            weight_of = {node.outputs[0]: node.attrs["name"] for node in fn.nodes if node.op == "weight"}
            targets = {node.inputs[0]: factors[fn.types[node.inputs[0]].shape[-1]] for node in fn.nodes
                       if node.op == "linear" and weight_of.get(node.inputs[1]) in downs}
            functions[key] = insert_online_hadamard(fn, module, targets)
        module = module.replace(functions=functions)
        return with_rotation_meta(module, "ffn", {"linears": len(downs), "sizes": sorted(sizes),
                                                  "factors": {str(n): f for n, f in factors.items()}})
