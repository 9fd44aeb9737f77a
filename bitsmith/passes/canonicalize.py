"""The canonicalize phase: fuse a traced graph (torch.export / ONNX) to LLM-level ops, derive `decode`, and keep
only the weights the two entry points read."""

from __future__ import annotations

import dataclasses

import numpy as np

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.derive_decode import DeriveDecode
from bitsmith.passes.eliminate_dead_code import EliminateDeadCode
from bitsmith.passes.fold_weight_expressions import FoldWeightExpressions
from bitsmith.passes.fuse_gelu import FuseGelu
from bitsmith.passes.fuse_linear_bias import FuseLinearBias
from bitsmith.passes.fuse_rmsnorm import FuseRmsnorm
from bitsmith.passes.fuse_rope import FuseRope
from bitsmith.passes.fuse_router import FuseRouter
from bitsmith.passes.fuse_silu import FuseSilu
from bitsmith.passes.manager import Pass, is_traced, run_passes
from bitsmith.passes.simplify_layout import SimplifyLayout

# What a traced module (prefill alone) goes through; each fusion drops the nodes it left unread. fuse_rope needs
# the symbolic `seq` dim to tell the layout, so all of them run on prefill alone; decode is derived afterwards by
# binding seq = 1, and the last step drops the weights no entry point reads any more.
CANONICALIZE: tuple[type[Pass], ...] = (EliminateDeadCode, FoldWeightExpressions, FuseSilu, FuseGelu, FuseLinearBias,
                                        FuseRmsnorm, FuseRope, FuseRouter, SimplifyLayout, DeriveDecode,
                                        EliminateDeadCode)


def canonicalize(module: Module, weights: dict[str, np.ndarray]) -> tuple[Module, dict[str, np.ndarray]]:
    """A traced module (prefill alone) and its weights -> prefill + decode and only the weights they read."""
    ctx = PassContext(dict(weights))
    module = run_passes(module, ctx, [p() for p in CANONICALIZE], verify=False)
    return module, {k: v for k, v in ctx.weights.entries().items() if k in module.weights}


def canonical_model(model: LoadedModel) -> LoadedModel:
    """`model` with a canonical module: a traced one (prefill alone, from torch.export or ONNX) goes through the
    canonicalize phase; a hand-built one (both entry points) is already canonical and passes through."""
    if not is_traced(model.module):
        return model
    module, weights = canonicalize(model.module, model.weights)
    return dataclasses.replace(model, module=module, weights=weights)
