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

from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.ir import Function, Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.calibrate import initial_envs, linear_inputs, run_segment, split_by_layer
from bitsmith.passes.manager import Pass
from bitsmith.passes.quant.awq import quantize_awq, search_awq_scales
from bitsmith.passes.quant.gptq import accumulate_hessian, quantize_gptq
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.passes.quant.scheme import QuantizedWeight, QuantScheme, dequantize
from bitsmith.passes.rewrite import producers

AWQ_MAX_ROWS = 4096  # activation rows kept per input for the AWQ searches


class InputStats:
    """Per observed value: running Hessian (GPTQ) and a bounded row sample (AWQ)."""

    def __init__(self, need_hessian: set[str], need_rows: set[str], seed: int = 0):
        self.need_hessian, self.need_rows = need_hessian, need_rows
        self.hessian: dict[str, tuple[np.ndarray, int]] = {}
        self.rows: dict[str, list[np.ndarray]] = {}
        self.rng = np.random.default_rng(seed)

    def __call__(self, value: str, x: np.ndarray) -> None:
        if value in self.need_hessian:
            h, n = self.hessian.get(value, (None, 0))
            self.hessian[value] = accumulate_hessian(h, x, n)
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
    """Writes ctx.quantized (weight name -> codes and scales, for pack_weights) and the dequantized values
    into ctx.weights, so later layers calibrate on what the artifact computes."""

    damp: float = 0.01
    act_order: bool = True
    name = "quantize_weights"
    requires = frozenset({"precision_planned"})
    provides = frozenset({"quantized"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        plan = {k: QuantScheme.from_json(v) for k, v in module.meta.get("precision_plan", {}).items() if v}
        if not plan:
            return module
        if all(s.method == "rtn" for s in plan.values()):
            for name, scheme in tqdm(plan.items(), desc="quantizing (rtn)", leave=False, disable=len(plan) < 16):
                self._store(ctx, name, quantize_rtn(ctx.weights[name], scheme))
            return module
        if ctx.calibration is None:
            raise BitsmithError("GPTQ/AWQ need calibration tokens", where=f"pass {self.name}",
                                fix="compile a model with a tokenizer, or use --method rtn")
        fn = module["prefill"]
        envs = initial_envs(module, ctx.calibration)
        segments = split_by_layer(module)
        targets_of = [{w: v for w, v in linear_inputs(fn, seg).items() if w in plan} for seg in segments]
        last = max(i for i, t in enumerate(targets_of) if t)  # later segments (e.g. the logits) need not run
        for seg, targets in tqdm(list(zip(segments, targets_of))[:last + 1], desc="quantizing layers", leave=False):
            if targets:
                stats = InputStats({v for w, v in targets.items() if plan[w].method == "gptq"},
                                   {v for w, v in targets.items() if plan[w].method == "awq"})
                for env in envs:
                    run_segment(fn, seg, env, ctx.weights, stats, set(targets.values()))
                self._quantize_segment(fn, targets, plan, stats, ctx)
            envs = [run_segment(fn, seg, env, ctx.weights) for env in envs]
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
        for weight, value in targets.items():
            scheme, w = plan[weight], ctx.weights[weight]
            if scheme.method == "gptq":
                qw = quantize_gptq(w, stats.hessian[value][0], scheme, damp=self.damp, act_order=self.act_order)
            elif scheme.method == "awq":
                qw = quantize_awq(w, stats.sample(value), scheme, awq_scales[weight])
            else:
                qw = quantize_rtn(w, scheme)
            if not np.isfinite(qw.scales.astype(np.float32)).all():
                raise BitsmithError("quantization produced non-finite scales", where=f"pass {self.name}, weight "
                                    f"{weight}", fix="check the weight for inf/nan values")
            self._store(ctx, weight, qw)

    def _awq_scales(self, fn: Function, value: str, weights: list[str], plan: dict[str, QuantScheme],
                    stats: InputStats, ctx: PassContext) -> np.ndarray:
        """Search s for the AWQ linears reading `value` and fold 1/s into its producer (or return s = 1)."""
        in_features = ctx.weights[weights[0]].shape[1]
        target = _fold_target(fn, value)
        if target is None:
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
        ctx.quantized[name] = qw
        ctx.weights[name] = dequantize(qw)  # later layers see the quantized values
