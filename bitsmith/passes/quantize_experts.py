"""Stacked expert tensors [E, out, in] quantized one expert slice at a time (RTN, or GPTQ on the rows routed to it)."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.ir import Function
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext, QuantizedInfo
from bitsmith.passes.quant.gptq import HessianAccumulator, gptq_factor, quantize_gptq
from bitsmith.passes.quant.hqq import quantize_calibration_free
from bitsmith.passes.quant.packing import pack
from bitsmith.passes.quant.rtn import quantize_rtn, search_mse_clip
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize

# Stored as the stacked packed parts (names from quantize_weights.packed_names):
#   <stem>.qweight uint32 [E, out, words]   <stem>.scales f16 [E, out, groups]   (<stem>.zeros f16, asymmetric)
# slice e is exactly what a qlinear weight [out, in] would store (runtime/packed_layout.py).


def is_stacked(ctx: PassContext, name: str) -> bool:
    return len(ctx.weights.shape(name)) == 3


def refuse_awq(names: list[str], plan: dict[str, QuantScheme]) -> None:
    """AWQ folds 1/s into the op feeding a linear; the experts' input also feeds the router, so no exact fold."""
    bad = [n for n in names if plan[n].method == "awq"]
    if bad:
        raise BitsmithError(f"AWQ on stacked expert weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}) "
                            "is not supported: their input also feeds the router, so AWQ's scales cannot be folded",
                            where="pass quantize_weights",
                            fix="add --scheme '*.experts.*=int4-gptq' (or int8-rtn) so the experts use GPTQ/RTN while "
                                "the other linears keep AWQ")


def quantize_experts_rtn(ctx: PassContext, name: str, scheme: QuantScheme, names: tuple[str, str, str],
                         standin: bool = False, mse_clip: bool = False) -> None:
    """RTN (or HQQ, by the scheme) of every expert slice of `name`, stored by store_experts (`names`: qweight,
    scales, zeros)."""
    experts = ctx.weights.shape(name)[0]
    slices = [quantize_calibration_free(np.asarray(ctx.weights[name][e], dtype=np.float32), scheme, mse_clip)
              for e in range(experts)]
    store_experts(ctx, name, slices, scheme, names, standin)


def store_experts(ctx: PassContext, name: str, slices: list[QuantizedWeight], scheme: QuantScheme,
                  names: tuple[str, str, str], standin: bool) -> None:
    """Stack the per-expert packed parts into ctx.weights; the float weight replaced by its dequantized stack
    (`standin`: later layers calibrate on what the artifact computes) or dropped."""
    qname, sname, zname = names
    for e, qw in enumerate(slices):
        if not np.isfinite(qw.scales.astype(np.float32)).all():
            raise BitsmithError("quantization produced non-finite scales", where=f"pass quantize_weights, weight "
                                f"{name}[{e}]", fix="check the weight for inf/nan values")
    ctx.weights[qname] = np.stack([pack(qw.q, scheme.bits) for qw in slices])
    ctx.weights[sname] = np.stack([qw.scales for qw in slices])
    if not scheme.sym:
        ctx.weights[zname] = np.stack([qw.zeros for qw in slices])
    out_f, in_f = slices[0].q.shape
    ctx.quantized[name] = QuantizedInfo(scheme, out_f, in_f)
    if standin:
        ctx.weights[name] = np.stack([dequantize(qw) for qw in slices])
    else:
        del ctx.weights[name]


def gptq_experts(fn: Function, nodes: list, plan: dict[str, QuantScheme]) -> dict[str, tuple[str, str, str]]:
    """moe input value -> (expert-index value, gate_up name, down name) of the segment's moe nodes planned GPTQ."""
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    out = {}
    for node in nodes:
        if node.op == "moe":
            gate_up, down = weight_of[node.inputs[3]], weight_of[node.inputs[4]]
            if any(plan.get(w) is not None and plan[w].method == "gptq" for w in (gate_up, down)):
                out[node.inputs[0]] = (node.inputs[2], gate_up, down)
    return out


class ExpertHessians:
    """An observer (run_samples) of each GPTQ moe node's input rows x [T, H] and expert indices [T, k]: per expert
    e the Hessian of the rows routed to it (gate_up's input) and of silu(gate_e x) * up_e x on them (down's
    input, through the float gate_up: the layer is calibrated on float weights, as the dense linears are).
    Memory: E x (H^2 + I^2) float64 per block (fine at test and bench sizes; a 47B Mixtral layer would need 14 GB)."""

    def __init__(self, targets: dict[str, tuple[str, str, str]], weights) -> None:
        self.targets, self.weights = targets, weights
        self.index_of = {idx: x for x, (idx, _, _) in targets.items()}
        self.observed = set(targets) | set(self.index_of)
        self.pending: dict[str, np.ndarray] = {}
        self.hessians: dict[str, list[HessianAccumulator]] = {}

    def __call__(self, value: str, a: np.ndarray) -> None:
        if value in self.targets:
            self.pending[value] = np.array(a, dtype=np.float32)  # its indices come later in the same sample
        elif value in self.index_of:
            self._add(self.index_of[value], self.pending.pop(self.index_of[value]), a)

    def _add(self, xv: str, x: np.ndarray, idx: np.ndarray) -> None:
        _, gate_up, down = self.targets[xv]
        gu = self.weights[gate_up]  # [E, 2I, H]
        inter = gu.shape[1] // 2
        acc_gu = self.hessians.setdefault(gate_up, [HessianAccumulator(gu.shape[2]) for _ in range(gu.shape[0])])
        acc_dn = self.hessians.setdefault(down, [HessianAccumulator(inter) for _ in range(gu.shape[0])])
        for e in np.unique(idx):
            rows = x[np.nonzero((idx == e).any(axis=-1))[0]]
            g = rows @ np.asarray(gu[e], dtype=np.float32).T
            acc_gu[e].add(rows)
            acc_dn[e].add(g[:, :inter] / (1 + np.exp(-g[:, :inter])) * g[:, inter:])

    def quantize(self, ctx: PassContext, plan: dict[str, QuantScheme], names_of, damp: float, act_order: bool,
                 mse_clip: bool = False) -> None:
        """GPTQ each planned expert slice on its own Hessian; an expert no calibration token reached has none
        (GPTQ would zero its weights as dead inputs) and gets RTN instead."""
        for name, accs in self.hessians.items():
            scheme = plan.get(name)  # a block's other tensor may be RTN (quantized before the layers ran)
            if scheme is None or scheme.method != "gptq":
                continue
            slices = []
            for e, acc in enumerate(accs):
                w = np.asarray(ctx.weights[name][e], dtype=np.float32)
                if acc.n == 0:
                    slices.append(quantize_rtn(w, scheme, search_mse_clip(w, scheme) if mse_clip else 1.0))
                    continue
                factor = gptq_factor(acc.result(), damp, act_order, where=f"pass quantize_weights, {name}[{e}]")
                slices.append(quantize_gptq(w, None, scheme, factor=factor, mse_clip=mse_clip))
            store_experts(ctx, name, slices, scheme, names_of(name), standin=True)
        self.hessians.clear()
