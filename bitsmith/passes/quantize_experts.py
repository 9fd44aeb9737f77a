"""Stacked expert tensors [E, out, in] quantized one expert slice at a time (RTN), each slice with its own scales."""

from __future__ import annotations

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext, QuantizedInfo
from bitsmith.passes.quant.packing import pack
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.passes.quant.scheme import QuantScheme, dequantize

# Stored as the stacked packed parts (names from quantize_weights.packed_names):
#   <stem>.qweight uint32 [E, out, words]   <stem>.scales f16 [E, out, groups]   (<stem>.zeros f16, asymmetric)
# slice e is exactly what a qlinear weight [out, in] would store (runtime/packed_layout.py).


def is_stacked(ctx: PassContext, name: str) -> bool:
    return len(ctx.weights.shape(name)) == 3


def refuse_calibrated(names: list[str], plan: dict[str, QuantScheme]) -> None:
    """GPTQ/AWQ need one Hessian / activation sample per expert (the rows routed to it): not done yet, so refuse."""
    bad = [n for n in names if plan[n].method != "rtn"]
    if bad:
        raise BitsmithError(f"{plan[bad[0]].method.upper()} on stacked expert weights ({', '.join(bad[:3])}"
                            f"{', ...' if len(bad) > 3 else ''}) is not supported: experts are quantized with RTN",
                            where="pass quantize_weights",
                            fix="add --scheme '*.experts.*=int8-rtn' (or int4-rtn) so the experts use RTN while the "
                                "other linears keep GPTQ/AWQ, or use --method rtn")


def quantize_experts_rtn(ctx: PassContext, name: str, scheme: QuantScheme, names: tuple[str, str, str],
                         standin: bool = False) -> None:
    """Quantize every expert slice of `name`, write the stacked packed parts (`names`: qweight, scales, zeros), record the scheme of one slice
    (out, in) in ctx.quantized. With `standin` the dequantized stack replaces the float weight (later layers
    calibrate on what the artifact computes), else the float weight is dropped."""
    experts, out_f, in_f = ctx.weights.shape(name)
    qname, sname, zname = names
    codes, scales, zeros, deq = [], [], [], []
    for e in range(experts):
        qw = quantize_rtn(np.asarray(ctx.weights[name][e], dtype=np.float32), scheme)
        if not np.isfinite(qw.scales.astype(np.float32)).all():
            raise BitsmithError("quantization produced non-finite scales", where=f"pass quantize_weights, weight "
                                f"{name}[{e}]", fix="check the weight for inf/nan values")
        codes.append(pack(qw.q, scheme.bits))
        scales.append(qw.scales)
        zeros.append(qw.zeros)
        if standin:
            deq.append(dequantize(qw))
    ctx.weights[qname] = np.stack(codes)
    ctx.weights[sname] = np.stack(scales)
    if not scheme.sym:
        ctx.weights[zname] = np.stack(zeros)
    ctx.quantized[name] = QuantizedInfo(scheme, out_f, in_f)
    if standin:
        ctx.weights[name] = np.stack(deq)
    else:
        del ctx.weights[name]
