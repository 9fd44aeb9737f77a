"""Calibration: run the prefill graph one decoder layer at a time over calibration samples, observing linear inputs.

Streaming keeps memory at one layer's activations: only the values that cross a layer boundary (the
residual stream, positions) are kept per sample, and one KV-cache buffer is shared by all samples
(each layer's attention writes positions 0..T-1 of its own slot before reading them).
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np

from bitsmith.compiler.ir import Function, Module, Node
from bitsmith.compiler.ops import OPS, RefContext, bind
from bitsmith.errors import BitsmithError

ValueObserver = Callable[[str, np.ndarray], None]  # (value name, activations [tokens, features])


LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")  # layers.3. / transformer.h.3. / gpt_neox.layers.3.


def layer_index(name: str) -> int | None:
    """The decoder layer a weight belongs to, from its name; None for embeddings, final norm and head."""
    match = LAYER_NAME.search(name)
    return int(match.group(1)) if match else None


# constants every layer reads (rotation_sites: the online Hadamard factors `rotation.hadamard<m>`) go to segment -1:
# in segment L every node after the first online rotation followed them there, and layer weights then crossed
# segments as env values, so a changed (quantized) weight never reached the later segments
SHARED_WEIGHT_PREFIXES = ("rotation.",)


def _weight_layer(name: str, num_layers: int) -> int:
    index = layer_index(name)
    if index is not None:
        return index
    if name.startswith(SHARED_WEIGHT_PREFIXES):
        return -1
    return num_layers  # final norm / lm_head last (embeddings: see layer_of_nodes)


def layer_of_nodes(fn: Function, num_layers: int) -> list[int]:
    """Segment index per node: -1 (embedding), 0..L-1 (decoder layers), L (final norm and head).

    A node belongs to the latest layer among its inputs (a weight node to its weight's layer), so
    stable-sorting by segment keeps every input before its use.
    """
    layer_of_value: dict[str, int] = {name: -1 for name, _ in fn.inputs}
    # a table that an `embedding` reads is segment -1 even when named lm_head.weight (tied) or transformer.wpe
    tables = {n.inputs[0] for n in fn.nodes if n.op == "embedding"}
    layers = []
    for node in fn.nodes:
        if node.op == "weight":
            layer = -1 if node.outputs[0] in tables else _weight_layer(node.attrs["name"], num_layers)
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
        (i for n in module.weights if (i := layer_index(n)) is not None), default=-1)
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
    for name in sorted(pending & set(env)):  # a linear reading the segment's input (OLMo 2: no pre-norm)
        pending.discard(name)
        if observe:
            observe(name, env[name].reshape(-1, env[name].shape[-1]))
    for node in seg.nodes:
        args = [values[v] for v in node.inputs]
        for name, value in zip(node.outputs, OPS[node.op].ref(args, node.attrs, ctx)):
            values[name] = value
            if observe and name in pending:
                pending.discard(name)
                observe(name, value.reshape(-1, value.shape[-1]))
    return {k: values[k] for k in seg.live_out if k in values} | {
        k: env[k] for k in ("tokens", "positions", "kv_cache")}


def initial_envs(module: Module, samples: np.ndarray, caches: int = 1) -> list[dict[str, np.ndarray]]:
    """Per-sample inputs of the prefill entry; sample i uses KV-cache buffer i % caches (one buffer per
    sample running at once: see run_samples)."""
    cache_type = module["prefill"].inputs[2][1]
    seqlen = samples.shape[1]
    buffers = [np.zeros(bind(cache_type.shape, {"ctx": seqlen}), dtype=np.float32) for _ in range(caches)]
    positions = np.arange(seqlen, dtype=np.int64)
    return [{"tokens": s, "positions": positions, "kv_cache": buffers[i % caches]} for i, s in enumerate(samples)]


CALIBRATION_THREADS = 2  # samples run at once; initial_envs(..., caches=CALIBRATION_THREADS) gives each its cache


def run_samples(fn: Function, seg: Segment, envs: list[dict[str, np.ndarray]], weights: Mapping[str, np.ndarray],
                observe: ValueObserver | None = None, observed: set[str] | None = None,
                threads: int = CALIBRATION_THREADS) -> list[dict[str, np.ndarray]]:
    """run_segment over every sample, `threads` samples at a time, each thread on single-threaded BLAS.

    Why: one sample's ops are [seq, features] matmuls and elementwise loops; a 2-thread BLAS splits each
    small attention product between threads, and on a busy host one waiting on the other cost 0.25 s per
    attention call against 16 ms alone. Whole samples in parallel use both cores with no such handoff.
    Sample i must use cache i % threads (initial_envs(..., caches=threads)): the threads run samples
    i, i+1, ... of one wave together. Observations are buffered per sample and replayed in sample order
    after each wave (with BLAS threads back), so `observe` sees exactly the sequential order: same
    Hessians, same AWQ row samples.
    """
    from threadpoolctl import threadpool_limits  # noqa: PLC0415 (a small import, only where samples run)

    caches = {id(env["kv_cache"]) for env in envs}
    threads = max(1, min(threads, len(envs), len(caches)))
    if threads == 1:
        return [run_segment(fn, seg, env, weights, observe, observed) for env in envs]
    out: list[dict[str, np.ndarray]] = []
    with ThreadPoolExecutor(threads) as pool:
        for first in range(0, len(envs), threads):
            wave = envs[first:first + threads]
            if len({id(env["kv_cache"]) for env in wave}) != len(wave):
                raise BitsmithError("samples running at once share a KV-cache buffer", where="run_samples",
                                    fix="build the envs with initial_envs(module, samples, caches=threads)")
            logs: list[list[tuple[str, np.ndarray]]] = [[] for _ in wave]

            def one(i: int) -> dict[str, np.ndarray]:
                # a copy: the value may be a view into an array a later op of the segment reuses
                record = None if observe is None else (lambda name, x: logs[i].append((name, np.array(x))))
                return run_segment(fn, seg, wave[i], weights, record, observed)

            with threadpool_limits(limits=1, user_api="blas"):
                out += list(pool.map(one, range(len(wave))))
            if observe is not None:
                for log in logs:
                    for name, x in log:
                        observe(name, x)
    return out
