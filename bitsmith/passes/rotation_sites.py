"""Where the rotate passes act: the residual stream's writers and readers, its norms, and each attention's v/o pair.

    embedding ──(E)──► r0 ─┬─ rmsnorm(γ) ─► linear reads (q/k/v, gate/up, lm_head)     input columns  W @ R1
                           └─ add ◄─ linear writes (o_proj, down_proj)                 output rows   R1^T @ W
                                     │
                                     r1 ─ ... ─ final rmsnorm ─► lm_head

Anything else on the stream (a LayerNorm, a norm on a writer's output as in Gemma 2, a mixture of experts) is
refused with the op's name: the rewrite is exact only for this shape.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.rewrite import FunctionRewriter, consumers, const_value, producers

SCALE_OPS = ("mul", "div")  # an embedding scaled by a scalar constant (Gemma: sqrt(hidden)) stays on the stream


@dataclass(frozen=True)
class Linear:
    weight: str  # weight name [out, in]
    bias: str | None  # bias weight name [out], or None


@dataclass(frozen=True)
class HeadPair:
    """An attention's value projection and the output projection that reads its heads."""

    layer: int
    v: Linear  # rows [kv_heads * head_dim, hidden]
    o: Linear  # columns [hidden, heads * head_dim]
    kv_heads: int
    heads: int
    head_dim: int


@dataclass(frozen=True)
class ResidualSites:
    embeddings: tuple[str, ...]  # tables that write the stream
    norms: tuple[tuple[str | None, tuple[Linear, ...]], ...]  # (rmsnorm weight or None, the linears reading it)
    writers: tuple[Linear, ...]  # linears whose output is added into the stream
    heads: tuple[HeadPair, ...]
    norm_inputs: tuple[str, ...] = ()  # the stream values the norms read (this function's names)


def _refuse(fn: Function, node: Node, why: str) -> BitsmithError:
    return BitsmithError(f"cannot rotate this model: {why} (node {node.outputs[0]}: {node.op})",
                         where=f"rotate passes, {fn.name}",
                         fix="compile without --rotate (rotations support RMSNorm decoders with plain residual adds: "
                             "Llama, Qwen, Mistral, SmolLM families)")


def _linear(node: Node, weight_of: dict[str, str]) -> Linear:
    return Linear(weight_of[node.inputs[1]], weight_of.get(node.inputs[2]) if len(node.inputs) == 3 else None)


def find_residual_sites(fn: Function) -> ResidualSites:
    """Walk the residual stream of `fn` from the embedding to the last norm; refuse any shape the rewrite cannot keep
    exact."""
    prod, users = producers(fn), consumers(fn)
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    embeds = [n for n in fn.nodes if n.op == "embedding"]
    if len(embeds) != 1:
        raise BitsmithError(f"cannot rotate this model: {len(embeds)} embedding lookups (expected one)",
                            where=f"rotate passes, {fn.name}", fix="compile without --rotate")
    stream = embeds[0].outputs[0]
    for node in users.get(stream, []):  # an embedding scale by a scalar constant commutes with a rotation
        if node.op in SCALE_OPS and len(users[stream]) == 1:
            other = next(v for v in node.inputs if v != stream)
            value = const_value(prod.get(other))
            if value is None or value.size != 1 or node.inputs[0] != stream:
                raise _refuse(fn, node, "the embedding is scaled by something other than a scalar constant")
            stream = node.outputs[0]
    norms, writers, seen_norms, norm_inputs = [], [], set(), []
    while True:
        next_stream, readers = None, []
        for node in users.get(stream, []):
            if node.op == "add":
                other = next((v for v in node.inputs if v != stream), None)
                writer = prod.get(other) if other is not None else None
                if writer is None or writer.op != "linear" or next_stream is not None:
                    raise _refuse(fn, node, "the residual add's other operand is not a linear's output")
                writers.append(_linear(writer, weight_of))
                next_stream = node.outputs[0]
            elif node.op == "rmsnorm":
                readers.append(node)
                norm_inputs.append(stream)
            else:
                raise _refuse(fn, node, "the residual stream feeds an op other than rmsnorm or add")
        for norm in readers:
            linears = []
            for user in users.get(norm.outputs[0], []):
                if user.op != "linear" or user.inputs[0] != norm.outputs[0]:
                    raise _refuse(fn, user, "a norm of the residual feeds an op other than a linear")
                linears.append(_linear(user, weight_of))
            gamma = weight_of.get(norm.inputs[1]) if len(norm.inputs) == 2 else None
            if len(norm.inputs) == 2 and gamma is None:
                raise _refuse(fn, norm, "the norm's scale is computed, not a weight")
            key = (gamma, tuple(linears))
            if key not in seen_norms:
                seen_norms.add(key)
                norms.append(key)
        if next_stream is None:
            break
        stream = next_stream
    if not norms:
        raise BitsmithError("cannot rotate this model: no norm reads the residual stream",
                            where=f"rotate passes, {fn.name}", fix="compile without --rotate")
    return ResidualSites((weight_of[embeds[0].inputs[0]],), tuple(norms), tuple(writers), find_head_pairs(fn),
                         tuple(dict.fromkeys(norm_inputs)))


def find_head_pairs(fn: Function) -> tuple[HeadPair, ...]:
    """Each attention's v_proj (through a reshape to [seq, kv_heads, head_dim]) and o_proj (through a flattening
    reshape); an attention whose value or output takes another path is refused."""
    prod, users = producers(fn), consumers(fn)
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    pairs = []
    for node in fn.nodes:
        if node.op != "attention":
            continue
        shaped = prod.get(node.inputs[2])
        v_lin = prod.get(shaped.inputs[0]) if shaped is not None and shaped.op == "reshape" else None
        if v_lin is None or v_lin.op != "linear":
            raise _refuse(fn, node, "the attention's values do not come from a reshaped linear (v_proj)")
        flat = users.get(node.outputs[0], [])
        o_lin = [u for f in flat if f.op == "reshape" for u in users.get(f.outputs[0], [])]
        if len(flat) != 1 or len(o_lin) != 1 or o_lin[0].op != "linear" or o_lin[0].inputs[0] != flat[0].outputs[0]:
            raise _refuse(fn, node, "the attention's output does not go through one reshape to a linear (o_proj)")
        _, kv_heads, head_dim = fn.types[node.inputs[2]].shape
        heads = fn.types[node.inputs[0]].shape[1]
        pairs.append(HeadPair(node.attrs["layer"], _linear(v_lin, weight_of), _linear(o_lin[0], weight_of),
                              kv_heads, heads, head_dim))
    return tuple(pairs)


def add_online_factor(module: Module, ctx: PassContext, factor: np.ndarray | None) -> tuple[Module, str | None]:
    """Register an online rotation's dense factor as a float32 weight `rotation.hadamard<m>` (shared by every op of
    that size); returns the module with it and its name (None: no factor, a power-of-two size)."""
    if factor is None:
        return module, None
    name = f"rotation.hadamard{factor.shape[0]}"
    if name not in module.weights:
        ctx.weights[name] = factor.astype(np.float32)
        module = module.replace(weights={**module.weights, name: TensorType(factor.shape, "float32")})
    return module, name


def insert_online_hadamard(fn: Function, module: Module, targets: dict[str, str | None]) -> Function:
    """`fn` with `hadamard` applied to each value in `targets` (value -> its factor weight name or None) right where
    it is produced; every later use reads the rotated value."""
    rw = FunctionRewriter(fn, module.weights)
    for node in fn.nodes:
        rw.keep(node)
        for out in node.outputs:
            if out in targets:
                inputs = [out]
                if targets[out] is not None:
                    inputs.append(rw.emit("weight", [], targets[out], name=targets[out]))
                rw.replace(out, rw.emit("hadamard", inputs, f"{out}.rotated"))
    return rw.finish()


def with_rotation_meta(module: Module, key: str, record: dict) -> Module:
    """The module with manifest metadata `rotation[key] = record` (what was rotated, for inspect and the report)."""
    return module.replace(meta={**module.meta, "rotation": {**module.meta.get("rotation", {}), key: record}})
