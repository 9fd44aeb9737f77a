"""`bitsmith search`: sensitivity + kernel cost model + ILP -> a per-tensor plan, its Pareto front and a plot."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_tokens
from bitsmith.compiler.experts import expert_weights
from bitsmith.compiler.loader import load_model
from bitsmith.compiler.reference import ReferenceSession, upcast_weights
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import KEEP, AssignPrecision, linear_weights
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.passes.kv_plan import KVPlanOptions, plan_kv_cache
from bitsmith.passes.plan_kv_cache import peak_activation_bytes
from bitsmith.runtime.quant_scheme import parse_scheme
from bitsmith.search.cost import LatencyTable, tensor_bytes
from bitsmith.passes.expert_usage import measure_usage
from bitsmith.search.experts import active_experts, expand, expert_choice, roundtrip, tie, units
from bitsmith.search.sensitivity import CANDIDATES, KEEP16, measure_sensitivity
from bitsmith.search.solver import Choice, minimum_bytes, solve

PLAN_FORMAT = "bitsmith-plan"


@dataclass(frozen=True)
class SearchOptions:
    memory: int  # bytes: weights + KV cache + workspace
    context: int = 2048
    batch: int = 1  # sequences decoded together (KV cache and GEMV batch)
    latency: float | None = None  # seconds per decode step, None: unconstrained
    keep: tuple[str, ...] = ()
    keep_default: bool = True
    calib: str | None = None
    calib_samples: int = 4
    calib_seqlen: int = 128
    pareto_points: int = 10
    measure: int = 8  # Pareto plans whose KLD is measured (not only predicted)
    cache_dir: str | None = None


@dataclass
class SearchModel:
    """Everything the solver needs about one model: per-tensor choices and the fixed costs."""

    options: dict[str, list[Choice]]
    fixed_bytes: int  # weights outside the search (embedding, norms, kept-by-rule) + KV cache + workspace
    kv_bytes: int
    workspace_bytes: int
    params: int  # weights in the searched tensors
    shapes: dict[str, tuple[int, ...]]
    units: dict[str, list[str]] = field(default_factory=dict)  # `layers.N.mlp.experts` -> its stacked tensors


def model_hash(source: dict) -> str:
    return hashlib.sha256(json.dumps(source.get("files") or source, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fixed_tensors(module, opts: SearchOptions) -> set[str]:
    """Tensors fixed at 16-bit: --keep patterns and (unless turned off) the first/last-layer default."""
    plan = AssignPrecision(parse_scheme("int4"), opts.keep_default, opts.keep).plan(module)
    return {name for name, s in plan.items() if s is KEEP}


def build_search_model(model, opts: SearchOptions, sens, latency: LatencyTable,
                       usage: dict[str, dict] | None = None) -> SearchModel:
    """`usage`: measured expert usage per MoE block (measure_usage); without it experts are used uniformly."""
    module = model.module
    tensors = linear_weights(module)
    fixed16 = fixed_tensors(module, opts)
    shapes = {t: tuple(model.weights[t].shape) for t in tensors}
    experts = expert_weights(module)  # stacked [E, out, in]: all E stored, top_k slices read per token
    options: dict[str, list[Choice]] = {}
    for t in tensors:
        out_f, in_f = shapes[t][-2:]
        schemes = [KEEP16] if t in fixed16 else [KEEP16, *CANDIDATES]
        options[t] = [Choice(s, tensor_bytes(out_f, in_f, s), latency.seconds(out_f, in_f, s, opts.batch),
                             sens.kld[t][s] if t in sens.kld else 0.0) for s in schemes]
        if t in experts:  # one slice's GEMV (its rows of the batch), times the experts a step reads
            ex = experts[t]
            active = active_experts(ex, (usage or {}).get(ex.block, {}).get("frequency"), opts.batch)
            options[t] = [expert_choice(ex, c.scheme, c.bytes, latency.seconds(out_f, in_f, c.scheme, 1), c.kld, active)
                          for c in options[t]]
    unit_map = units({t: experts[t] for t in tensors if t in experts})
    options = tie(options, unit_map)  # a block's gate_up and down take one scheme (the qmoe kernel reads both)
    other = sum(2 * int(np.prod(w.shape)) for name, w in model.weights.items() if name not in shapes)
    cache_shape = module["decode"].inputs[2][1].shape
    kv = plan_kv_cache(KVPlanOptions(None, opts.context, opts.batch, "float16"), cache_shape[0], cache_shape[3],
                       cache_shape[4], 0, 0).bytes
    workspace = peak_activation_bytes(module["prefill"], 16)
    return SearchModel(options, other + kv + workspace, kv, workspace,
                       sum(int(np.prod(s)) for s in shapes.values()), shapes, unit_map)


def plan_stats(sm: SearchModel, picked: dict[str, Choice], overhead_s: float) -> dict[str, float]:
    weight_bytes = sum(c.bytes for c in picked.values())
    bits = sum(8 * c.bytes for c in picked.values()) / sm.params
    return {"bytes": int(weight_bytes + sm.fixed_bytes), "searched_bytes": int(weight_bytes), "bpw": bits,
            "kld_pred": float(sum(c.kld for c in picked.values())),
            "latency_pred_ms": 1e3 * (overhead_s + sum(c.seconds for c in picked.values()))}


def measured_kld(module, weights: dict[str, np.ndarray], plan: dict[str, str], samples: np.ndarray) -> float:
    """KLD of the plan (RTN, dequantized) against the 16-bit model on held-out samples, reference executor."""
    quantized = dict(weights)
    for name, scheme in plan.items():
        if scheme != KEEP16:
            quantized[name] = roundtrip(weights[name], scheme)
    total, count = 0.0, 0
    for sample in samples:
        ref = ReferenceSession(module, weights, len(sample)).prefill(list(sample))
        got = ReferenceSession(module, quantized, len(sample)).prefill(list(sample))
        ref = ref - ref.max(-1, keepdims=True)
        got = got - got.max(-1, keepdims=True)
        ref_lp = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
        got_lp = got - np.log(np.exp(got).sum(-1, keepdims=True))
        total += float((np.exp(ref_lp) * (ref_lp - got_lp)).sum())
        count += len(sample)
    return total / count


def _calibration(model, opts: SearchOptions, seed: int) -> np.ndarray:
    samples = calibration_tokens(model, CalibrationOptions(opts.calib, opts.calib_samples, opts.calib_seqlen, seed))
    if samples is None:
        raise BitsmithError("the model has no tokenizer for calibration text", where="search",
                            fix="search a model that ships a tokenizer")
    return samples


def run_search(source: str | Path | None, opts: SearchOptions, out: Path,
               log: Callable[[str], None] | None = None, overhead_s: float | None = None) -> dict[str, Any]:
    """Search, write `out` (the chosen plan), `out`.pareto.json and `out`.pareto.png; returns the report."""
    t0 = time.time()
    cache = Path(opts.cache_dir) if opts.cache_dir else Path.home() / ".cache" / "bitsmith" / "search"
    model = canonical_model(load_model(source, log=log))
    weights = upcast_weights(model.weights)
    samples = _calibration(model, opts, seed=0)
    held_out = _calibration(model, opts, seed=1)
    fixed16 = fixed_tensors(model.module, opts)
    tensors = [t for t in linear_weights(model.module) if t not in fixed16]  # fixed ones need no sensitivity
    sens = measure_sensitivity(model.module, weights, samples, tensors, cache, model_hash(model.source), log)
    latency = LatencyTable(cache)
    usage = measure_usage(model.module, weights, samples) if expert_weights(model.module) else {}
    sm = build_search_model(model, opts, sens, latency, usage)
    if overhead_s is None:  # non-GEMV work per step: lm_head (a dense GEMV), attention, norms, ... (estimated)
        overhead_s = _overhead_estimate(model, opts, latency)
    budget = opts.memory - sm.fixed_bytes
    max_s = None if opts.latency is None else opts.latency - overhead_s
    smallest = sm.fixed_bytes + minimum_bytes(sm.options)
    if budget < minimum_bytes(sm.options) or (max_s is not None and max_s <= 0):
        raise BitsmithError(f"the budget {opts.memory / 2**20:.1f} MiB cannot hold the model (the smallest feasible "
                            f"plan needs {smallest / 2**20:.1f} MiB: fixed weights + KV cache {sm.kv_bytes / 2**20:.1f} MiB "
                            f"+ workspace + every searched tensor at its smallest scheme)", where="search",
                            fix=f"use --memory {int(np.ceil(smallest / 2**20)) + 1}MiB or more, or a smaller --context/--batch")
    chosen = solve(sm.options, budget, max_s)
    if chosen is None:
        raise BitsmithError("no plan meets both the memory and the latency budget", where="search",
                            fix="raise --latency or --memory")
    pareto = pareto_front(sm, opts, max_s, overhead_s)
    _measure(model.module, weights, pareto, held_out, opts.measure)
    plan = expand({t: c.scheme for t, c in sorted(chosen.items())}, sm.units)
    stats = plan_stats(sm, chosen, overhead_s)
    stats["kld_meas"] = measured_kld(model.module, weights, plan, held_out)
    report = {"format": PLAN_FORMAT, "version": 1, "model": str(source) if source else "default",
              "model_hash": model_hash(model.source), "method": "rtn", "weights": plan,
              "options": asdict(opts), "predicted": stats, "pareto": pareto, "spearman": _spearman(pareto),
              "seconds": round(time.time() - t0, 1), "fixed_bytes": sm.fixed_bytes, "kv_bytes": sm.kv_bytes,
              **({"expert_usage": usage} if usage else {})}
    write_outputs(report, out)
    return report


def _overhead_estimate(model, opts: SearchOptions, latency: LatencyTable) -> float:
    """The lm_head GEMV (measured, 16-bit) plus 15 us per layer for attention, norms, rope and SwiGLU."""
    vocab, hidden = model.weights["embed_tokens.weight"].shape
    layers = model.module["decode"].inputs[2][1].shape[0]
    return latency.seconds(vocab, hidden, KEEP16, opts.batch) + 15e-6 * layers


def pareto_front(sm: SearchModel, opts: SearchOptions, max_s: float | None, overhead_s: float) -> list[dict]:
    lo = minimum_bytes(sm.options)
    hi = sum(max(c.bytes for c in choices) for choices in sm.options.values())
    points, seen = [], set()
    for budget in np.linspace(lo, hi, opts.pareto_points):
        picked = solve(sm.options, budget, max_s)
        if picked is None:
            continue
        key = tuple(sorted((t, c.scheme) for t, c in picked.items()))
        if key in seen:
            continue
        seen.add(key)
        points.append({**plan_stats(sm, picked, overhead_s),
                       "plan": expand({t: c.scheme for t, c in picked.items()}, sm.units)})
    return points


def _measure(module, weights, pareto: list[dict], samples: np.ndarray, count: int) -> None:
    """Measure the KLD of up to `count` Pareto plans spread over the front (written into each point)."""
    picks = sorted(set(np.linspace(0, len(pareto) - 1, min(count, len(pareto))).round().astype(int)))
    for i in picks:
        pareto[i]["kld_meas"] = measured_kld(module, weights, pareto[i]["plan"], samples)


def _spearman(pareto: list[dict]) -> float | None:
    from scipy.stats import spearmanr  # heavy: scipy

    pts = [(p["kld_pred"], p["kld_meas"]) for p in pareto if "kld_meas" in p]
    if len(pts) < 3:
        return None
    return float(spearmanr([a for a, _ in pts], [b for _, b in pts]).statistic)


def format_pareto(report: dict) -> str:
    lines = [f"{'MiB':>8} {'bpw':>6} {'latency ms (pred)':>17} {'KLD pred':>10} {'KLD meas':>10}"]
    for p in report["pareto"]:
        meas = f"{p['kld_meas']:.5f}" if "kld_meas" in p else "-"
        lines.append(f"{p['bytes'] / 2**20:>8.2f} {p['bpw']:>6.2f} {p['latency_pred_ms']:>17.3f} "
                     f"{p['kld_pred']:>10.5f} {meas:>10}")
    s = report["predicted"]
    lines.append(f"chosen: {s['bytes'] / 2**20:.2f} MiB, {s['bpw']:.2f} bits/weight, predicted "
                 f"{s['latency_pred_ms']:.3f} ms/token, KLD predicted {s['kld_pred']:.5f} measured {s['kld_meas']:.5f}; "
                 f"Spearman(pred, meas) over the front: {report['spearman']}")
    return "\n".join(lines)


def write_outputs(report: dict, out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plan = {k: v for k, v in report.items() if k != "pareto"}
    out.write_text(json.dumps(plan, indent=1))
    pareto_json = out.with_suffix(".pareto.json")
    pareto_json.write_text(json.dumps(report["pareto"], indent=1))
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    fig, ax = plt.subplots(figsize=(6, 4))
    pts = report["pareto"]
    ax.plot([p["bytes"] / 2**20 for p in pts], [p["kld_pred"] for p in pts], "o-", label="predicted KLD")
    meas = [p for p in pts if "kld_meas" in p]
    ax.plot([p["bytes"] / 2**20 for p in meas], [p["kld_meas"] for p in meas], "s", label="measured KLD")
    ax.axvline(report["predicted"]["bytes"] / 2**20, color="gray", ls="--", label="chosen")
    ax.set_xlabel("memory (MiB: weights + KV cache + workspace)")
    ax.set_ylabel("KL divergence vs 16-bit")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(f"bitsmith search: {report['model']}")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".pareto.png"), dpi=100)
    plt.close(fig)


def plan_to_overrides(path: str | Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(keep patterns, scheme overrides) that make `compile` build exactly the plan in `path`."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsmithError(f"cannot read the plan {path}: {exc}", where="--plan", fix="pass a plan from `bitsmith search`") from exc
    if data.get("format") != PLAN_FORMAT or not isinstance(data.get("weights"), dict):
        raise BitsmithError(f"{path} is not a bitsmith plan", where="--plan", fix="pass a plan from `bitsmith search`")
    keep = tuple(n for n, s in data["weights"].items() if s == KEEP16)
    schemes = tuple((n, f"{s}-{data.get('method', 'rtn')}") for n, s in data["weights"].items() if s != KEEP16)
    return keep, schemes
