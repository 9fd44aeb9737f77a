"""Experts in the search: a stacked tensor's per-slice RTN/HQQ round trip, its cost (all experts stored, top_k read per
token), and one search unit per MoE block (its gate_up and down share a scheme, as the qmoe kernel reads them)."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.experts import ExpertWeight
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.runtime.quant_scheme import dequantize, parse_scheme
from bitsmith.search.solver import Choice


def roundtrip(w: np.ndarray, scheme: str) -> np.ndarray:
    """Quantize + dequantize by the scheme's method (RTN, or HQQ for `...-hqq`): [out, in] as one weight,
    [E, out, in] one expert slice at a time."""
    s = parse_scheme(scheme)
    quantize = quantize_rtn
    if s.method == "hqq":
        from bitsmith.passes.quant.hqq import quantize_hqq  # lands with --method hqq

        quantize = quantize_hqq
    if w.ndim == 3:
        return np.stack([dequantize(quantize(w[e], s)) for e in range(w.shape[0])])
    return dequantize(quantize(w, s))


def active_experts(expert: ExpertWeight, frequency: list[float] | None, batch: int) -> float:
    """Expected distinct experts a decode step of `batch` rows reads: sum_e 1 - (1 - f_e)^batch, f_e the share of
    tokens routed to e (measured on the calibration tokens; uniform top_k / E without). top_k at batch 1."""
    freq = frequency or [expert.top_k / expert.experts] * expert.experts
    return float(sum(1 - (1 - min(f, 1.0)) ** batch for f in freq))


def expert_choice(expert: ExpertWeight, scheme: str, bytes_one: int, seconds_one: float, kld: float,
                  active: float) -> Choice:
    """One expert slice's bytes / GEMV seconds -> the stacked tensor's: every expert stored, `active` read per step
    (each chosen expert once, its rows batched)."""
    return Choice(scheme, bytes_one * expert.experts, seconds_one * active, kld)


def units(experts: dict[str, ExpertWeight]) -> dict[str, list[str]]:
    """`layers.N.mlp.experts` -> its stacked tensors (searched as one)."""
    out: dict[str, list[str]] = {}
    for name, w in sorted(experts.items()):
        out.setdefault(f"{w.block}.experts", []).append(name)
    return out


def tie(options: dict[str, list[Choice]], unit_map: dict[str, list[str]]) -> dict[str, list[Choice]]:
    """The tensors of each unit replaced by the unit: per scheme the sum of their bytes, seconds and KLD."""
    tied = {k: v for k, v in options.items() if not any(k in ts for ts in unit_map.values())}
    for unit, tensors in unit_map.items():
        by_scheme = [{c.scheme: c for c in options[t]} for t in tensors]
        schemes = [s for s in by_scheme[0] if all(s in b for b in by_scheme)]
        tied[unit] = [Choice(s, sum(b[s].bytes for b in by_scheme), sum(b[s].seconds for b in by_scheme),
                             sum(b[s].kld for b in by_scheme)) for s in schemes]
    return tied


def expand(plan: dict[str, str], unit_map: dict[str, list[str]]) -> dict[str, str]:
    """A plan over units -> over tensors."""
    out = {}
    for name, scheme in plan.items():
        for t in unit_map.get(name, [name]):
            out[t] = scheme
    return out
