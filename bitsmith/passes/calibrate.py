"""Calibration: run the prefill graph one decoder layer at a time over calibration samples, observing linear inputs.

Streaming keeps memory at one layer's activations: only the values that cross a layer boundary (the
residual stream, positions) are kept per sample, and one KV-cache buffer is shared by all samples
(each layer's attention writes positions 0..T-1 of its own slot before reading them).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.compiler.ops import OPS, RefContext, bind

ValueObserver = Callable[[str, np.ndarray], None]  # (value name, activations [tokens, features])


def _weight_layer(name: str, num_layers: int) -> int:
    match = re.match(r"layers\.(\d+)\.", name)
    if match:
        return int(match.group(1))
    return -1 if name.startswith("embed") else num_layers  # embeddings first, final norm / lm_head last


def layer_of_nodes(fn: Function, num_layers: int) -> list[int]:
    """Segment index per node: -1 (embedding), 0..L-1 (decoder layers), L (final norm and head).

    A node belongs to the latest layer among its inputs (a weight node to its weight's layer), so
    stable-sorting by segment keeps every input before its use.
    """
    layer_of_value: dict[str, int] = {name: -1 for name, _ in fn.inputs}
    layers = []
    for node in fn.nodes:
        if node.op == "weight":
            layer = _weight_layer(node.attrs["name"], num_layers)
        else:
            layer = max((layer_of_value[v] for v in node.inputs), default=-1)
        for v in node.outputs:
            layer_of_value[v] = layer
        layers.append(layer)
    return layers


@dataclass
class Segment:
    index: int
    nodes: list[Node]
    live_out: set[str]  # values later segments (or the outputs) read


def split_by_layer(module: Module, entry: str = "prefill") -> list[Segment]:
    fn = module[entry]
    num_layers = module.meta.get("config", {}).get("num_layers") or 1 + max(
        (int(m.group(1)) for n in module.weights if (m := re.match(r"layers\.(\d+)\.", n))), default=-1)
    layers = layer_of_nodes(fn, num_layers)
    order = sorted(range(len(fn.nodes)), key=lambda i: layers[i])
    segments: list[Segment] = []
    for i in order:
        if not segments or segments[-1].index != layers[i]:
            segments.append(Segment(layers[i], [], set()))
        segments[-1].nodes.append(fn.nodes[i])
    needed = set(fn.outputs)
    for seg in reversed(segments):
        seg.live_out = set(needed)
        defined = {v for n in seg.nodes for v in n.outputs}
        needed = (needed - defined) | {v for n in seg.nodes for v in n.inputs if v not in defined}
    return segments


def linear_inputs(fn: Function, seg: Segment) -> dict[str, str]:
    """weight name -> the value a `linear` node of this segment multiplies it with."""
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    return {weight_of[n.inputs[1]]: n.inputs[0] for n in seg.nodes
            if n.op == "linear" and n.inputs[1] in weight_of}


def run_segment(fn: Function, seg: Segment, env: dict[str, np.ndarray], weights: Mapping[str, np.ndarray],
                observe: ValueObserver | None = None, observed: set[str] | None = None) -> dict[str, np.ndarray]:
    """Run one segment on one sample, calling `observe` once for each value in `observed`.

    Returns the values the segment must hand to later segments.
    """
    ctx = RefContext(weights, {"seq": int(env["tokens"].shape[0]), "ctx": int(env["kv_cache"].shape[2])})
    values = dict(env)
    pending = set(observed or ())
    for node in seg.nodes:
        args = [values[v] for v in node.inputs]
        for name, value in zip(node.outputs, OPS[node.op].ref(args, node.attrs, ctx)):
            values[name] = value
            if observe and name in pending:
                pending.discard(name)
                observe(name, value.reshape(-1, value.shape[-1]))
    return {k: values[k] for k in seg.live_out if k in values} | {
        k: env[k] for k in ("tokens", "positions", "kv_cache")}


def initial_envs(module: Module, samples: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Per-sample inputs of the prefill entry, all sharing one KV-cache buffer."""
    cache_type = module["prefill"].inputs[2][1]
    seqlen = samples.shape[1]
    cache = np.zeros(bind(cache_type.shape, {"ctx": seqlen}), dtype=np.float32)
    positions = np.arange(seqlen, dtype=np.int64)
    return [{"tokens": s, "positions": positions, "kv_cache": cache} for s in samples]
