"""fold_norm_scales: move each residual RMSNorm's scale into the linears that read it, so the stream can be rotated."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Module, Node
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass
from bitsmith.passes.rotation_sites import find_residual_sites, with_rotation_meta
from bitsmith.passes.untie_lm_head import LM_HEAD, UntieLmHead

EMBED_TABLE = "embed_tokens.weight"


@dataclass(frozen=True)
class FoldNormScales(Pass):
    """rmsnorm(x) * g feeding W equals rmsnorm(x) feeding W diag(g): the linears' input columns take g and the
    norm's scale becomes ones except on find_outlier_channels' channels, which R1 leaves alone (kept as a weight, so AWQ can still fold its scales there later). Only a unit-scale
    RMSNorm commutes with an orthogonal R (||x R|| = ||x||), which is what rotate_residual needs.

    A tied lm_head reads the last norm: when that norm's scale is not all ones the head is untied first, since
    the embedding table must not take the scale; precision assignment keeps it 16-bit as the tied table was
    (module.meta["rotation"]["untied_head"]) unless a --scheme names it."""

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
