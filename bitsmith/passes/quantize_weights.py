"""Quantize every weight the precision plan assigns a scheme, layer by layer on calibration activations.

Layer i is calibrated on the outputs of the already-quantized layers before it (GPTQ-style sequential
quantization): for each layer segment, run it once with float weights while collecting what the
methods need (GPTQ: the input Hessian; AWQ: a sample of input rows), quantize its weights, then run
it again with the quantized weights to produce the next layer's inputs.

AWQ scales s must be undone on the activations: 1/s is folded into the op producing the linear's
input when that is exact: the RMSNorm weight (q/k/v, gate/up) or up_proj's rows (down_proj, whose input
is silu(gate) * up). Elsewhere (o_proj: GQA heads share value rows) s = 1 and only the clip search applies.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.ir import Function, Module
from bitsmith.compiler.ops.quant import qlinear_input_names
from bitsmith.errors import BitsmithError
from bitsmith.compiler.weight_store import WeightStore
from bitsmith.passes.base import PassContext, QuantizedInfo
from bitsmith.passes.calibrate import CALIBRATION_THREADS, initial_envs, linear_inputs, run_samples, split_by_layer
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.awq import quantize_awq, search_awq_scales
from bitsmith.passes.quant.gptq import HessianAccumulator, gptq_factor, quantize_gptq
from bitsmith.passes.quant.packing import pack
from bitsmith.passes.quant.hqq import quantize_calibration_free
from bitsmith.passes.quantize_experts import (ExpertHessians, gptq_experts, is_stacked, quantize_experts_rtn,
                                              refuse_awq)
from bitsmith.runtime.quant_scheme import CALIBRATION_FREE_METHODS, QuantizedWeight, QuantScheme, dequantize
from bitsmith.passes.rewrite import producers
from bitsmith.runtime.packed_layout import packed_shape, unpack

AWQ_MAX_ROWS = 4096  # activation rows kept per input for the AWQ searches
RTN_CHUNK_ELEMENTS = 4 << 20  # weights per RTN work item: 16 MB of fp32 rows (rows are independent in RTN)
RTN_THREADS = 2  # numpy releases the GIL in its array loops, so chunks quantize on both cores


def packed_names(weight: str) -> tuple[str, str, str]:
    """weight "layers.0.mlp.down_proj.weight" is stored as
      "layers.0.mlp.down_proj.qweight"  uint32 [out, words]   (layout: passes/quant/packing.py)
      "layers.0.mlp.down_proj.scales"   float16 [out, groups]  (int8 codes with super-groups)
      "layers.0.mlp.down_proj.zeros"    float16 [out, groups]  (asymmetric schemes only; int8 with super-groups)
    and, for imported schemes only, the parts `part_names` adds."""
    stem = weight.removesuffix(".weight")
    return f"{stem}.qweight", f"{stem}.scales", f"{stem}.zeros"


def part_kinds(scheme: QuantScheme, has_perm: bool = False) -> list[str]:
    """The kinds of stored parts of a weight of this scheme, in qlinear's input order (qlinear_input_names):
      qweight, scales, [zeros], [super_scales, [super_zeros]] (float16 [out, ceil(in/256)]), [perm] (int32 [in])"""
    attrs = {"sym": scheme.sym, "offset": scheme.offset, "super_group": scheme.super_group, "has_perm": has_perm}
    return qlinear_input_names(attrs)


def part_names(weight: str, scheme: QuantScheme, has_perm: bool = False) -> tuple[str, ...]:
    """The stored names of those parts: "<stem>.qweight", "<stem>.scales", ... (see packed_names)."""
    stem = weight.removesuffix(".weight")
    return tuple(f"{stem}.{kind}" for kind in part_kinds(scheme, has_perm))


class SegmentWeights(Mapping[str, np.ndarray]):
    """The store's weights as one calibration segment reads them: each read once, then kept until the segment
    is done (every calibration sample reads the same layer). The `dense` ones (the segment's linear weights)
    are kept as float32: the reference linear converts a bf16/fp16 operand on every call, i.e. once per
    sample, which is the same values at 32x the cost."""

    def __init__(self, store: WeightStore, dense: set[str] = frozenset()):
        self.store, self.cache, self.dense = store, {}, dense
        self.lock = threading.Lock()  # samples run in threads (run_samples): the first asker reads, once

    def __getitem__(self, name: str) -> np.ndarray:
        with self.lock:
            if name not in self.cache:
                value = self.store[name]
                if name in self.dense and value.dtype != np.float32:
                    value = value.astype(np.float32)
                self.cache[name] = value
            return self.cache[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)


class InputStats:
    """Per observed value: running Hessian (GPTQ) and a bounded row sample (AWQ)."""

    def __init__(self, need_hessian: set[str], need_rows: set[str], seed: int = 0):
        self.need_hessian, self.need_rows = need_hessian, need_rows
        self.hessians: dict[str, HessianAccumulator] = {}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def __call__(self, value: str, x: np.ndarray) -> None:
        if value in self.need_hessian:
            if value not in self.hessians:
                self.hessians[value] = HessianAccumulator(x.shape[-1])
            self.hessians[value].add(x)
        if value in self.need_rows:
            keep = x if x.shape[0] <= 256 else x[self.rng.choice(x.shape[0], 256, replace=False)]
            self.rows.setdefault(value, []).append(np.array(keep, dtype=np.float32))

    def sample(self, value: str) -> np.ndarray:
        rows = np.concatenate(self.rows[value])
        return rows if rows.shape[0] <= AWQ_MAX_ROWS else rows[self.rng.choice(rows.shape[0], AWQ_MAX_ROWS, False)]


def _fold_target(fn: Function, value: str) -> tuple[str, str] | None:
    """Where 1/s can be folded exactly: ("norm", weight) or ("rows", up_proj weight); None if nowhere."""
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    prod = producers(fn)
    node = prod.get(value)
    if node is None:
        return None
    if node.op == "rmsnorm" and len(node.inputs) == 2:
        return ("norm", weight_of[node.inputs[1]])
    if node.op == "mul":
        for operand in node.inputs:
            source = prod.get(operand)
            if source is not None and source.op == "linear" and len(source.inputs) == 2:
                other = prod.get(next(v for v in node.inputs if v != operand))
                if other is not None and other.op in ("silu", "gelu"):
                    return ("rows", weight_of[source.inputs[1]])
    return None


@dataclass(frozen=True)
class QuantizeWeights(Pass):
    """Writes each quantized weight's packed parts (packed_names) into ctx.weights and its scheme into
    ctx.quantized; the float weight is dropped once its layer is done (pack_weights rewrites the IR).
    GPTQ/AWQ: while a layer is being calibrated its dequantized values stand in for the float weight,
    so later layers calibrate on what the artifact computes. RTN and HQQ stream each weight in row chunks."""

    damp: float = 0.01
    act_order: bool = True
    clip: str = "none"  # "mse": RTN and GPTQ ranges clipped per group by search_mse_clip
    name = "quantize_weights"
    requires = frozenset({"precision_planned"})
    provides = frozenset({"quantized"})

    @property
    def mse_clip(self) -> bool:
        return self.clip == "mse"

    def run(self, module: Module, ctx: PassContext) -> Module:
        plan = {k: QuantScheme.from_json(v) for k, v in module.meta.get("precision_plan", {}).items() if v}
        imported = [n for n, scheme in plan.items() if scheme.method == "imported"]
        for name in imported:  # packed as they are; the float values stay as calibration stand-ins until the end
            del plan[name]
            store_imported(ctx, name)
        module = self._quantize(module, ctx, plan) if plan else module
        for name in imported:
            ctx.weights.pop(name, None)
        return module

    def _quantize(self, module: Module, ctx: PassContext, plan: dict[str, QuantScheme]) -> Module:
        experts = [name for name in plan if is_stacked(ctx, name)]  # [E, out, in]: RTN per expert slice
        if all(s.method in CALIBRATION_FREE_METHODS for s in plan.values()):  # RTN/HQQ: no calibration pass
            methods = "/".join(sorted({s.method for s in plan.values()}))
            with ThreadPoolExecutor(RTN_THREADS) as pool:
                for name, scheme in tqdm(plan.items(), desc=f"quantizing ({methods})", leave=False,
                                         disable=len(plan) < 16):
                    if name in experts:
                        quantize_experts_rtn(ctx, name, scheme, packed_names(name), mse_clip=self.mse_clip)
                    else:
                        quantize_rtn_streamed(ctx, name, scheme, pool, self.mse_clip)
            return module
        refuse_awq(experts, plan)
        # RTN/HQQ experts first: their dequantized stand-ins serve while the layers calibrate
        for name in [n for n in experts if plan[n].method in CALIBRATION_FREE_METHODS]:
            quantize_experts_rtn(ctx, name, plan.pop(name), packed_names(name), standin=True, mse_clip=self.mse_clip)
        if not plan:
            for name in experts:
                del ctx.weights[name]
            return module
        if ctx.calibration is None:
            raise BitsmithError("GPTQ/AWQ need calibration tokens", where=f"pass {self.name}",
                                fix="compile a model with a tokenizer, or use --method rtn")
        fn = module["prefill"]
        envs = initial_envs(module, ctx.calibration, caches=CALIBRATION_THREADS)
        segments = split_by_layer(module)
        targets_of = [{w: v for w, v in linear_inputs(fn, seg).items() if w in plan} for seg in segments]
        moe_of = [gptq_experts(fn, seg.nodes, plan) for seg in segments]  # GPTQ experts: Hessians per expert
        last = max(i for i, (t, m) in enumerate(zip(targets_of, moe_of)) if t or m)  # later segments need not run
        for seg, targets, moe in tqdm(list(zip(segments, targets_of, moe_of))[:last + 1], desc="quantizing layers",
                                      leave=False):
            dense = set(linear_inputs(fn, seg))
            if targets or moe:
                stats = InputStats({v for w, v in targets.items() if plan[w].method == "gptq"},
                                   {v for w, v in targets.items() if plan[w].method == "awq"})
                hessians = ExpertHessians(moe, ctx.weights)
                weights = SegmentWeights(ctx.weights, dense)
                observe = (lambda v, x: (stats(v, x), hessians(v, x))) if moe else stats
                run_samples(fn, seg, envs, weights, observe, set(targets.values()) | hessians.observed)
                del weights
                self._quantize_segment(fn, targets, plan, stats, ctx)
                hessians.quantize(ctx, plan, packed_names, self.damp, self.act_order, self.mse_clip)
            weights = SegmentWeights(ctx.weights, dense)
            envs = run_samples(fn, seg, envs, weights)
            del weights
            for weight in targets:  # the dequantized stand-ins have done their job
                del ctx.weights[weight]
        for name in experts:
            del ctx.weights[name]
        return module

    def _quantize_segment(self, fn: Function, targets: dict[str, str], plan: dict[str, QuantScheme],
                          stats: InputStats, ctx: PassContext) -> None:
        by_input: dict[str, list[str]] = {}
        for weight, value in targets.items():
            by_input.setdefault(value, []).append(weight)
        # Decide and fold every AWQ scale first: a fold may rescale another target's rows (down -> up).
        awq_scales: dict[str, np.ndarray] = {}
        for value, weights in by_input.items():
            awq = [w for w in weights if plan[w].method == "awq"]
            if awq:
                s = self._awq_scales(fn, value, awq, plan, stats, ctx)
                awq_scales.update({w: s for w in awq})
        for value, weights in by_input.items():
            # one factorisation of the input's Hessian serves every GPTQ linear reading it (q/k/v, gate/up);
            # the Hessian is dropped once factored, the factor once its linears are done
            factor = None
            if value in stats.hessians:
                factor = gptq_factor(stats.hessians.pop(value).result(), self.damp, self.act_order,
                                     where=f"pass {self.name}, input of {', '.join(weights)}")
            for weight in weights:
                scheme, w = plan[weight], ctx.weights[weight]
                if scheme.method == "gptq":
                    qw = quantize_gptq(w, None, scheme, factor=factor, mse_clip=self.mse_clip)
                elif scheme.method == "awq":
                    qw = quantize_awq(w, stats.sample(value), scheme, awq_scales[weight])
                else:  # rtn, hqq
                    qw = quantize_calibration_free(w, scheme, self.mse_clip)
                del w
                if not np.isfinite(qw.scales.astype(np.float32)).all():
                    raise BitsmithError("quantization produced non-finite scales", where=f"pass {self.name}, "
                                        f"weight {weight}", fix="check the weight for inf/nan values")
                self._store(ctx, weight, qw)
            del factor

    def _awq_scales(self, fn: Function, value: str, weights: list[str], plan: dict[str, QuantScheme],
                    stats: InputStats, ctx: PassContext) -> np.ndarray:
        """Search s for the AWQ linears reading `value` and fold 1/s into its producer (or return s = 1)."""
        in_features = ctx.weights.shape(weights[0])[1]
        target = _fold_target(fn, value)
        if target is None or _fold_touches_imported(fn, value, target, ctx):
            return np.ones(in_features, dtype=np.float32)
        s = search_awq_scales([ctx.weights[w] for w in weights], stats.sample(value), plan[weights[0]])
        kind, producer = target
        if kind == "norm":
            ctx.weights[producer] = (np.asarray(ctx.weights[producer], dtype=np.float32) / s).astype(np.float32)
        else:  # up_proj output rows feed the down_proj input channels one to one
            ctx.weights[producer] = (np.asarray(ctx.weights[producer], dtype=np.float32) / s[:, None])
        return s

    @staticmethod
    def _store(ctx: PassContext, name: str, qw: QuantizedWeight) -> None:
        store_packed(ctx, name, qw)
        ctx.weights[name] = dequantize(qw)  # the rest of this layer's calibration sees the quantized values


def _fold_touches_imported(fn: Function, value: str, target: tuple[str, str], ctx: PassContext) -> bool:
    """Whether folding 1/s into `target` would change what an imported weight computes: it reads `value` too (its
    codes cannot take the matching s), or it is the up_proj whose rows the fold rescales. Then s = 1 (exact)."""
    imported = {name for name, info in ctx.quantized.items() if info.source_type}
    if not imported:
        return False
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    readers = {weight_of.get(n.inputs[1]) for n in fn.nodes if n.op == "linear" and n.inputs[0] == value}
    return bool(readers & imported) or target[1] in imported


def store_packed(ctx: PassContext, name: str, qw: QuantizedWeight, source_type: str | None = None) -> None:
    """Write qw's packed parts into ctx.weights and its scheme into ctx.quantized."""
    parts = [pack(qw.q, qw.scheme.bits), qw.scales, qw.zeros, qw.super_scales, qw.super_zeros, qw.perm]
    names = part_names(name, qw.scheme, qw.perm is not None)
    for part_name, part in zip(names, [p for p in parts if p is not None]):
        ctx.weights[part_name] = part
    ctx.quantized[name] = QuantizedInfo(qw.scheme, qw.out_features, qw.in_features, qw.perm is not None,
                                        source_type)


def store_imported(ctx: PassContext, name: str) -> None:
    """Pack a weight whose codes came from a quantized source (ctx.imported) as they are; the float copy the frontend
    kept (the same values) stays for calibrating the other layers, and QuantizeWeights.run drops it at the end."""
    imported = ctx.imported.get(name)
    if imported is None:
        raise BitsmithError(f"the plan says {name!r} is imported, but the frontend gave no codes for it",
                            where="pass quantize_weights", fix="give it a scheme (--scheme) or recompile from the source")
    qw, source_type = imported
    if ctx.weights.shape(name) != qw.q.shape:
        raise BitsmithError(f"imported codes are {qw.q.shape}, the weight is {ctx.weights.shape(name)}",
                            where=f"pass quantize_weights, weight {name}",
                            fix="a pass changed the weight after import: requantize it (--requantize)")
    store_packed(ctx, name, qw, source_type)


def dequantized_weight(ctx: PassContext, name: str) -> np.ndarray:
    """float32 [out, in]: what the packed parts of quantized weight `name` stand for (tests, inspection)."""
    info = ctx.quantized[name]
    kinds, names = part_kinds(info.scheme, info.has_perm), part_names(name, info.scheme, info.has_perm)
    arrays = {kind: ctx.weights[n] for kind, n in zip(kinds, names)}
    q = unpack(arrays.pop("qweight"), info.scheme.bits, info.in_features)
    return dequantize(QuantizedWeight(q, arrays.pop("scales"), arrays.pop("zeros", None), info.scheme,
                                      info.in_features, **arrays))


def _row_chunks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, RTN_CHUNK_ELEMENTS // max(cols, 1))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def quantize_rtn_streamed(ctx: PassContext, name: str, scheme: QuantScheme, pool: ThreadPoolExecutor | None,
                          mse_clip: bool = False) -> None:
    """RTN or HQQ of one weight a chunk of rows at a time (both treat rows independently): read, quantize, pack
    and write each chunk, so memory holds a few chunks, never the whole weight in fp32; drops the float weight."""
    out, cols = ctx.weights.shape(name)
    qname, sname, zname = packed_names(name)
    where = f"pass quantize_weights, weight {name}"

    def work(span: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        qw = quantize_calibration_free(ctx.weights.read_rows(name, *span), scheme, mse_clip)
        if not np.isfinite(qw.scales.astype(np.float32)).all():
            raise BitsmithError("quantization produced non-finite scales", where=where,
                                fix="check the weight for inf/nan values")
        return pack(qw.q, scheme.bits), qw.scales, qw.zeros

    chunks = _row_chunks(out, cols)
    scales, zeros = [], []
    wave = RTN_THREADS if pool is not None else 1
    with ctx.weights.writer(qname, packed_shape(out, cols, scheme.bits), np.uint32) as writer:
        for first in range(0, len(chunks), wave):  # a wave at a time: results never pile up in memory
            batch = chunks[first:first + wave]
            for packed, s, z in (pool.map(work, batch) if pool is not None else map(work, batch)):
                writer.write(packed)
                scales.append(s)
                zeros.append(z)
    ctx.weights[sname] = np.concatenate(scales)
    if not scheme.sym:
        ctx.weights[zname] = np.concatenate(zeros)
    ctx.quantized[name] = QuantizedInfo(scheme, out, cols)
    del ctx.weights[name]
