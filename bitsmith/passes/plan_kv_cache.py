"""plan_kv_cache: choose the paged KV-cache layout and per-layer KV dtype under the memory budget."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.analysis import liveness
from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.compiler.weight_stats import weight_table
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.kv_plan import KVPlanOptions, plan_kv_cache
from bitsmith.passes.manager import Pass


def peak_activation_bytes(fn: Function, rows: int) -> int:
    """The most bytes of activations alive at once in `fn` with seq = rows (weights and the cache excluded)."""
    life = liveness(fn)
    cache = fn.inputs[2][0]
    weights = {v for node in fn.nodes if node.op == "weight" for v in node.outputs}
    sizes = {}
    for value, ttype in fn.types.items():
        if value in weights or value == cache or len(ttype.shape) == 5:
            continue
        shape = [rows if d == "seq" else d for d in ttype.shape]
        if all(isinstance(d, int) for d in shape):
            sizes[value] = int(np.prod(shape)) * np.dtype(ttype.dtype).itemsize
    peak = 0
    for index in range(len(fn.nodes) + 1):
        peak = max(peak, sum(n for v, n in sizes.items() if life[v][0] <= index <= life[v][1]))
    return peak


@dataclass(frozen=True)
class PlanKVCache(Pass):
    """Writes module.meta["kv_plan"] and ctx.kv_plan / ctx.memory_estimate, and tags every attention node with
    its layer's `kv_dtype`. Runs on the weights as stored (after cast_weights), whose bytes the budget counts."""

    options: KVPlanOptions
    workspace_rows: int = 16
    name = "plan_kv_cache"
    requires = frozenset({"canonical", "cast"})
    requires_when = {"quantized": "packed"}  # the budget counts the bytes of the weights as stored
    provides = frozenset({"kv_planned"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        decode = module["decode"]
        cache_shape = decode.inputs[2][1].shape  # [layers, 2, ctx, kv_heads, head_dim]
        layers, _, _, kv_heads, head_dim = cache_shape
        weight_bytes = sum(ctx.weights.nbytes(n) for n in module.weights)
        workspace = peak_activation_bytes(module["prefill"], self.workspace_rows)
        windows = [0] * layers  # each layer's sliding window, as its attention node says (0: global)
        for node in decode.nodes:
            if node.op == "attention" and 0 <= node.attrs["layer"] < layers:
                windows[node.attrs["layer"]] = int(node.attrs.get("sliding_window") or 0)
        table = weight_table(module, {n: ctx.weights.nbytes(n) for n in module.weights})
        params = sum(row["params"] for row in table.values())  # logical parameters: the refusal names bits/weight
        plan = plan_kv_cache(self.options, layers, kv_heads, head_dim, weight_bytes, workspace, tuple(windows), params)
        ctx.kv_plan = plan
        ctx.memory_estimate = {"weights": weight_bytes, "kv_cache": plan.bytes, "workspace": workspace}
        module = with_kv_dtypes(module, plan.layer_dtypes)
        return module.replace(meta={**module.meta, "kv_plan": plan.to_json()})


def with_kv_dtypes(module: Module, layer_dtypes: tuple[str, ...]) -> Module:
    """`module` with every attention node storing its KV cache as its layer's dtype."""
    functions = {}
    for name, fn in module.functions.items():
        nodes = []
        for node in fn.nodes:
            if node.op == "attention":
                layer = node.attrs["layer"]
                if not 0 <= layer < len(layer_dtypes):
                    raise BitsmithError(f"attention layer {layer} is outside the cache", where=f"{name} {node.name}")
                node = Node(node.op, node.inputs, node.outputs, {**node.attrs, "kv_dtype": layer_dtypes[layer]})
            nodes.append(node)
        functions[name] = fn.replace(nodes=tuple(nodes))
    return module.replace(functions=functions)
