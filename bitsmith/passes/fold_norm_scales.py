"""fold_norm_scales: move each residual RMSNorm's scale into the linears that read it, so the stream can be rotated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.rewrite import FunctionRewriter, map_functions
from bitsmith.passes.rotation_sites import find_residual_sites, with_rotation_meta
from bitsmith.passes.untie_lm_head import LM_HEAD, UntieLmHead

EMBED_TABLE = "embed_tokens.weight"
HEAD_NORM = "head_norm.weight"  # the last norm's scale for a head that stays tied (insert_head_norm)


@dataclass(frozen=True)
class FoldNormScales(Pass):
    """rmsnorm(x) * g feeding W equals rmsnorm(x) feeding W diag(g): the linears' input columns take g and the
    norm's scale becomes ones except on find_outlier_channels' channels, which R1 leaves alone (kept as a weight, so AWQ can still fold its scales there later). Only a unit-scale
    RMSNorm commutes with an orthogonal R (||x R|| = ||x||), which is what rotate_residual needs.

    A tied lm_head reads the last norm: when that norm's scale is not all ones the scale cannot go into the
    table (the embedding lookup reads it too), so it goes into a small 16-bit linear between the norm and the
    head (insert_head_norm; module.meta["rotation"]["head_norm"]). Only where the last norm feeds more than the
    head is the head untied instead (module.meta["rotation"]["untied_head"]), kept 16-bit as the table was."""

    name = "fold_norm_scales"
    requires = frozenset({"canonical"})
    provides = frozenset({"norms_folded"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        refuse_imported(module, ctx, self.name)
        kept = ctx.rotations.get("outliers", np.zeros(0, dtype=np.int64))  # find_outlier_channels: not rotated
        sites = find_residual_sites(module["prefill"])
        tables = set(sites.embeddings)
        gamma_of = {lin.weight: gamma for gamma, linears in sites.norms for lin in linears}
        if any(w in tables and g is not None and not _all_ones(_folded_part(ctx, g, kept)) for w, g in gamma_of.items()):
            if all(len(linears) == 1 for _, linears in sites.norms if any(lin.weight in tables for lin in linears)):
                module = with_rotation_meta(insert_head_norm(module, ctx, sites.embeddings[0]), "head_norm", HEAD_NORM)
            else:  # the last norm feeds more than the head: give the head its own copy instead
                module = with_rotation_meta(untie_head(module, ctx, sites.embeddings[0]), "untied_head", LM_HEAD)
            sites = find_residual_sites(module["prefill"])
        for gamma, linears in sites.norms:
            if gamma is None:
                continue
            g = _folded_part(ctx, gamma, kept)
            if _all_ones(g):
                continue
            for lin in linears:
                ctx.weights[lin.weight] = np.asarray(ctx.weights[lin.weight], dtype=np.float32) * g[None, :]
            left = np.ones_like(g)
            left[kept] = np.asarray(ctx.weights[gamma], dtype=np.float32)[kept] / g[kept]
            ctx.weights[gamma] = left  # 1, or what the kept (outlier) channels keep of their own scale
        return module


def insert_head_norm(module: Module, ctx: PassContext, table: str) -> Module:
    """Keep a tied head tied: an identity linear `head_norm.weight` [hidden, hidden] goes between the last norm and
    the head, so the loop below folds the norm's scale into it (diag(g)) and rotate_residual makes it
    R1^T diag(g) R1. One hidden x hidden 16-bit matrix (SmolLM2: 0.66 MB) instead of a second vocab x hidden table
    (57 MB), and the head still reads the rotated table E R1."""
    hidden = module.weights[table].shape[1]
    ctx.weights[HEAD_NORM] = np.eye(hidden, dtype=np.float32)
    module = module.replace(weights={**module.weights, HEAD_NORM: TensorType((hidden, hidden),
                                                                             module.weights[table].dtype)})

    def rewrite(fn: Function, module: Module) -> Function:
        weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        rw = FunctionRewriter(fn, module.weights)
        for node in fn.nodes:
            if node.op == "linear" and weight_of.get(node.inputs[1]) == table:
                scaled = rw.emit("linear", [node.inputs[0], rw.emit("weight", [], HEAD_NORM, name=HEAD_NORM)],
                                 "head_norm")
                node = Node(node.op, (scaled, *node.inputs[1:]), node.outputs, node.attrs)
            rw.keep(node)
        return rw.finish()

    return map_functions(module, rewrite)


def untie_head(module: Module, ctx: PassContext, table: str) -> Module:
    """Give the tied head and the embedding lookup separate weights: the head becomes `lm_head.weight`, or, when
    the table is already called that (traced models), the lookup reads a new `embed_tokens.weight`."""
    if table != LM_HEAD:
        return UntieLmHead().run(module, ctx)
    functions = {}
    for key, fn in module.functions.items():
        nodes = []
        for node in fn.nodes:
            if node.op == "embedding":
                value = f"{EMBED_TABLE}.untied"
                nodes.append(Node("weight", (), (value,), {"name": EMBED_TABLE}))
                node = Node(node.op, (value, *node.inputs[1:]), node.outputs, dict(node.attrs))
            nodes.append(node)
        types = {**fn.types, f"{EMBED_TABLE}.untied": module.weights[LM_HEAD]}
        functions[key] = fn.replace(nodes=tuple(nodes), types=types)
    ctx.weights.link(EMBED_TABLE, LM_HEAD)
    return module.replace(functions=functions, weights={**module.weights, EMBED_TABLE: module.weights[LM_HEAD]})


def _folded_part(ctx: PassContext, gamma: str, kept: np.ndarray) -> np.ndarray:
    """What moves into the readers' columns: the norm scale g, except on the kept (outlier) channels, which take
    the rms of the other channels' g and leave the rest of their own g in the norm. Why that and not 1: per-channel
    and per-group scales are set by a row's largest values, so a kept column left at the raw weight's magnitude
    beside columns multiplied by g (SmolLM2 layer 0: mean |g| 0.027) sets every row's step and rounds the rest
    to zero (RTN int4 per-channel KLD 6.1 when they took 1)."""
    g = np.array(ctx.weights[gamma], dtype=np.float32)
    if len(kept):
        rest = np.delete(g, kept)
        rms = float(np.sqrt(np.mean(np.square(rest, dtype=np.float64)))) if len(rest) else 0.0
        g[kept] = rms if rms > 0 else 1.0  # never 0: the norm keeps g / this
    return g


def _all_ones(g: np.ndarray) -> bool:
    return bool(np.all(g == 1))


def refuse_imported(module: Module, ctx: PassContext, where: str) -> None:
    """Rotations rewrite weights: codes imported as they are (GGUF, GPTQ checkpoints) would no longer match."""
    if ctx.imported:
        raise BitsmithError(f"--rotate rewrites the weights, but {len(ctx.imported)} of them are pre-quantized codes "
                            "kept as they are", where=f"pass {where}",
                            fix="add --requantize (dequantize, rotate, quantize again), or compile without --rotate")
