"""Canonicalise a traced graph (torch.export / ONNX): fuse to LLM-level ops, clean up, derive `decode`."""

from __future__ import annotations

import dataclasses

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.passes.derive_decode import derive_decode
from bitsmith.passes.fuse_gelu import fuse_gelu
from bitsmith.passes.fuse_linear_bias import fuse_linear_bias
from bitsmith.passes.fuse_rmsnorm import fuse_rmsnorm
from bitsmith.passes.fuse_rope import fuse_rope
from bitsmith.passes.fuse_silu import fuse_silu
from bitsmith.passes.simplify_layout import simplify_layout

# Each is Module -> Module. fuse_rope needs the symbolic `seq` dim to tell the layout, so all of them run on
# prefill alone; decode is derived afterwards by binding seq = 1.
FUSIONS = (fuse_silu, fuse_gelu, fuse_linear_bias, fuse_rmsnorm, fuse_rope, simplify_layout)


def _dce(module: Module) -> Module:
    return module.replace(functions={k: dead_code_elimination(f) for k, f in module.functions.items()})


def canonicalize(module: Module) -> Module:
    """`module` holds `prefill` only; returns prefill + decode with only the weights they read."""
    module = _dce(module)
    for fusion in FUSIONS:
        module = _dce(fusion(module))
    module = derive_decode(module)
    used = {n.attrs["name"] for f in module.functions.values() for n in f.nodes if n.op == "weight"}
    return module.replace(weights={k: t for k, t in module.weights.items() if k in used})


def canonical_model(model: LoadedModel) -> LoadedModel:
    """`model` with a canonical module: a traced one (prefill alone, from torch.export or ONNX) is fused and
    gets `decode`; a hand-built one (both entry points) is already canonical and passes through."""
    if "decode" in model.module.functions:
        return model
    module = canonicalize(model.module)
    weights = {k: v for k, v in model.weights.items() if k in module.weights}
    return dataclasses.replace(model, module=module, weights=weights)
