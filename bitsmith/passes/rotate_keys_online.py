"""rotate_keys_online: an online Hadamard on q and k after RoPE, so the KV cache stores rotated keys (QuaRot's R3)."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.rotation import online_factor
from bitsmith.passes.rotation_sites import add_online_factor, insert_online_hadamard, with_rotation_meta


@dataclass(frozen=True)
class RotateKeysOnline(Pass):
    """Scores are q . k = (q H)(k H)^T for an orthogonal H, so rotating both after RoPE changes no logit, but the
    cached keys' outlier channels (RoPE pairs with large norms) are spread over head_dim: what a 4-bit (or 8-bit)
    KV cache with one scale per head needs. RoPE cannot absorb it (it depends on the position), hence online."""

    seed: int = 0
    name = "rotate_keys_online"
    requires = frozenset({"canonical"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        functions, head_dims = {}, set()
        for key, fn in module.functions.items():
            targets = {}
            for node in fn.nodes:
                if node.op == "attention":
                    head_dim = fn.types[node.inputs[1]].shape[-1]
                    head_dims.add(head_dim)
                    module, factor = add_online_factor(module, ctx, online_factor(head_dim, self.seed))
                    targets[node.inputs[0]] = targets[node.inputs[1]] = factor
            functions[key] = insert_online_hadamard(fn, module, targets)
        if not head_dims:
            return module
        module = module.replace(functions=functions)
        return with_rotation_meta(module, "keys", {"head_dims": sorted(head_dims)})
