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
from bitsmith.runtime.quant_scheme import QUANTIZER_METHODS, parse_scheme
from bitsmith.search.cost import LatencyTable, online_rotation_bytes, tensor_bytes
from bitsmith.passes.expert_usage import measure_usage
from bitsmith.search.experts import active_experts, expand, expert_choice, roundtrip, tie, units
from bitsmith.search.rotation import rotate_model, rotation_kinds
from bitsmith.search.sensitivity import DEFAULT_METHODS, KEEP16, candidates, measure_sensitivity
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
    rotate: str = "none"  # none | hadamard | auto (both searched, the lower measured KLD kept)
    rotate_seed: int = 0  # the randomized Hadamard's signs, as `compile --rotate-seed`
    methods: tuple[str, ...] = DEFAULT_METHODS  # quantizers a tensor may get (candidates() per method)
    bpw: float | None = None  # a second budget: bits per searched weight (bench/search.py: equal-bpw comparisons)


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


def build_search_model(module, weights, opts: SearchOptions, sens, latency: LatencyTable,
                       usage: dict[str, dict] | None = None, tensors: list[str] | None = None) -> SearchModel:
    """`usage`: measured expert usage per MoE block (measure_usage); without it experts are used uniformly.
    `tensors`: the searched linear weights (default all); other weights count as fixed 16-bit bytes."""
    tensors = linear_weights(module) if tensors is None else tensors
    fixed16 = fixed_tensors(module, opts)
    shapes = {t: tuple(weights[t].shape) for t in tensors}
    experts = expert_weights(module)  # stacked [E, out, in]: all E stored, top_k slices read per token
    options: dict[str, list[Choice]] = {}
    for t in tensors:
        out_f, in_f = shapes[t][-2:]
        schemes = [KEEP16] if t in fixed16 else [KEEP16, *candidates(opts.methods)]
        options[t] = [Choice(s, tensor_bytes(out_f, in_f, s), latency.seconds(out_f, in_f, s, opts.batch),
                             sens.kld[t][s] if t in sens.kld else 0.0) for s in schemes]
        if t in experts:  # one slice's GEMV (its rows of the batch), times the experts a step reads
            ex = experts[t]
            active = active_experts(ex, (usage or {}).get(ex.block, {}).get("frequency"), opts.batch)
            options[t] = [expert_choice(ex, c.scheme, c.bytes, latency.seconds(out_f, in_f, c.scheme, 1), c.kld, active)
                          for c in options[t]]
    unit_map = units({t: experts[t] for t in tensors if t in experts})
    options = tie(options, unit_map)  # a block's gate_up and down take one scheme (the qmoe kernel reads both)
    other = sum(2 * int(np.prod(w.shape)) for name, w in weights.items() if name not in shapes)
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


class PlanScorer:
    """Measured KLD of plans (dequantized) against the 16-bit model on held-out samples, reference executor; the
    reference log-probabilities are computed once and each (tensor, scheme) round trip once (the plans of a
    front share most of them: SmolLM2's HQQ round trips take ~1 min per plan otherwise)."""

    def __init__(self, module, weights: dict[str, np.ndarray], samples: np.ndarray) -> None:
        self.module, self.weights, self.samples = module, weights, samples
        self.reference = [_log_softmax(ReferenceSession(module, weights, len(s)).prefill(list(s))) for s in samples]
        self.roundtrips: dict[tuple[str, str], np.ndarray] = {}

    def kld(self, plan: dict[str, str]) -> float:
        quantized = dict(self.weights)
        for name, scheme in plan.items():
            if scheme != KEEP16:
                if (name, scheme) not in self.roundtrips:
                    self.roundtrips[(name, scheme)] = roundtrip(self.weights[name], scheme)
                quantized[name] = self.roundtrips[(name, scheme)]
        total, count = 0.0, 0
        for sample, ref_lp in zip(self.samples, self.reference):
            got_lp = _log_softmax(ReferenceSession(self.module, quantized, len(sample)).prefill(list(sample)))
            total += float((np.exp(ref_lp) * (ref_lp - got_lp)).sum())
            count += len(sample)
        return total / count


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def measured_kld(module, weights: dict[str, np.ndarray], plan: dict[str, str], samples: np.ndarray) -> float:
    """KLD of one plan (dequantized) against the 16-bit model on held-out samples, reference executor."""
    return PlanScorer(module, weights, samples).kld(plan)


def compile_calibration(model, opts: SearchOptions) -> np.ndarray | None:
    """The tokens `compile` calibrates with by default (its --calib-samples/--calib-seqlen defaults, --calib as
    searched): the rotation's outlier channels are measured on them."""
    return calibration_tokens(model, CalibrationOptions(opts.calib))


def _calibration(model, opts: SearchOptions, seed: int) -> np.ndarray:
    samples = calibration_tokens(model, CalibrationOptions(opts.calib, opts.calib_samples, opts.calib_seqlen, seed))
    if samples is None:
        raise BitsmithError("the model has no tokenizer for calibration text", where="search",
                            fix="search a model that ships a tokenizer")
    return samples


def run_search(source: str | Path | None, opts: SearchOptions, out: Path,
               log: Callable[[str], None] | None = None, overhead_s: float | None = None) -> dict[str, Any]:
    """Search, write `out` (the chosen plan), `out`.pareto.json and `out`.pareto.png; returns the report.
    --rotate auto searches the model unrotated and rotated and keeps the plan with the lower measured KLD."""
    t0 = time.time()
    cache = Path(opts.cache_dir) if opts.cache_dir else Path.home() / ".cache" / "bitsmith" / "search"
    model = canonical_model(load_model(source, log=log))
    samples = _calibration(model, opts, seed=0)
    held_out = _calibration(model, opts, seed=1)
    reports, refused = [], {}
    for kind in rotation_kinds(opts.rotate):
        try:
            reports.append(search_rotation(model, kind, opts, samples, held_out, cache, log, overhead_s))
        except BitsmithError as exc:  # auto: a rotation that cannot meet the budget (its extra 16-bit weights) loses
            if opts.rotate != "auto" or kind == "hadamard" and not reports:
                raise
            refused[kind] = str(exc)
    report = min(reports, key=lambda r: r["predicted"]["kld_meas"])
    if opts.rotate == "auto":
        report["rotation_choices"] = {r["rotation"]["kind"]: {k: r["predicted"][k] for k in ("bytes", "bpw", "kld_pred",
                                                                                              "kld_meas")}
                                      for r in reports} | {k: {"refused": why} for k, why in refused.items()}
    report["model"] = str(source) if source else "default"
    report["seconds"] = round(time.time() - t0, 1)
    write_outputs(report, out)
    return report


def search_rotation(model, kind: str, opts: SearchOptions, samples: np.ndarray, held_out: np.ndarray, cache: Path,
                    log: Callable[[str], None] | None = None, overhead_s: float | None = None) -> dict[str, Any]:
    """One search of `model` rotated by `kind` (none | hadamard): sensitivities, latencies and KLDs are all the
    rotated model's. The tensors searched are the unrotated model's linears; what the rotation adds (a tied head's
    16-bit head_norm, or an untied copy of the head where the last norm feeds more) counts in the fixed bytes."""
    searched = linear_weights(model.module)
    module, weights = rotate_model(model.module, upcast_weights(model.weights), kind, opts.rotate_seed,
                                   compile_calibration(model, opts))
    created = [t for t in linear_weights(module) if t not in searched]
    fixed16 = fixed_tensors(module, opts)
    tensors = [t for t in searched if t not in fixed16]  # fixed ones need no sensitivity
    outliers = module.meta.get("rotation", {}).get("outliers", {}).get("channels")
    tag = model_hash(model.source) + ("" if kind == "none" else f"-{kind}{opts.rotate_seed}-{outliers}")
    sens = measure_sensitivity(module, weights, samples, tensors, cache, tag, log, candidates(opts.methods))
    latency = LatencyTable(cache)
    usage = measure_usage(module, weights, samples) if expert_weights(module) else {}
    sm = build_search_model(module, weights, opts, sens, latency, usage, searched)
    overhead_s = step_overhead(module, weights, opts, latency, overhead_s)
    budget = opts.memory - sm.fixed_bytes
    if opts.bpw is not None:
        budget = min(budget, opts.bpw * sm.params / 8)
    max_s = None if opts.latency is None else opts.latency - overhead_s
    smallest = sm.fixed_bytes + minimum_bytes(sm.options)
    if budget < minimum_bytes(sm.options) or (max_s is not None and max_s <= 0):
        raise BitsmithError(f"the budget {opts.memory / 2**20:.1f} MiB" + (f" at {opts.bpw} bits per searched weight"
                                                                           if opts.bpw is not None else "") +
                            f" cannot hold the{' rotated' if kind != 'none' else ''} model (the smallest feasible "
                            f"plan needs {smallest / 2**20:.1f} MiB: fixed weights + KV cache {sm.kv_bytes / 2**20:.1f} MiB "
                            f"+ workspace + every searched tensor at its smallest scheme)", where="search",
                            fix=f"use --memory {int(np.ceil(smallest / 2**20)) + 1}MiB or more, or a smaller --context/--batch")
    chosen = solve(sm.options, budget, max_s)
    if chosen is None:
        raise BitsmithError("no plan meets both the memory and the latency budget", where="search",
                            fix="raise --latency or --memory")
    pareto = pareto_front(sm, opts, max_s, overhead_s)
    scorer = PlanScorer(module, weights, held_out)
    _measure(scorer, pareto, opts.measure)
    plan = expand({t: c.scheme for t, c in sorted(chosen.items())}, sm.units) | {t: KEEP16 for t in created}
    stats = plan_stats(sm, chosen, overhead_s)
    stats["kld_meas"] = scorer.kld(plan)
    return {"format": PLAN_FORMAT, "version": 1, "model_hash": model_hash(model.source), "method": "rtn",
            "rotation": {"kind": kind, "seed": opts.rotate_seed, **({"outliers": outliers} if outliers else {})}, "methods": list(opts.methods), "weights": plan,
            "options": asdict(opts), "predicted": stats, "pareto": pareto, "spearman": _spearman(pareto),
            "fixed_bytes": sm.fixed_bytes, "kv_bytes": sm.kv_bytes,
            "online_rotation_bytes": online_rotation_bytes(module, opts.batch), **({"expert_usage": usage} if usage else {})}


def step_overhead(module, weights, opts: SearchOptions, latency: LatencyTable, overhead_s: float | None = None) -> float:
    """Predicted seconds per decode step outside the searched GEMVs: `overhead_s` (default _overhead_estimate: the
    lm_head, attention, norms, ...) plus a rotated model's online Hadamards, their bytes at the lm_head's bandwidth."""
    if overhead_s is None:
        overhead_s = _overhead_estimate(module, weights, opts, latency)
    moved = online_rotation_bytes(module, opts.batch)
    if not moved:  # unrotated: nothing to measure
        return overhead_s
    vocab, hidden = weights["embed_tokens.weight"].shape
    return overhead_s + moved / latency.bytes_per_second(vocab, hidden)


def _overhead_estimate(module, weights, opts: SearchOptions, latency: LatencyTable) -> float:
    """The lm_head GEMV (measured, 16-bit) plus 15 us per layer for attention, norms, rope and SwiGLU."""
    vocab, hidden = weights["embed_tokens.weight"].shape
    layers = module["decode"].inputs[2][1].shape[0]
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


def _measure(scorer: PlanScorer, pareto: list[dict], count: int) -> None:
    """Measure the KLD of up to `count` Pareto plans spread over the front (written into each point)."""
    picks = sorted(set(np.linspace(0, len(pareto) - 1, min(count, len(pareto))).round().astype(int)))
    for i in picks:
        pareto[i]["kld_meas"] = scorer.kld(pareto[i]["plan"])


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
                 f"Spearman(pred, meas) over the front: {report['spearman']}; rotation {report['rotation']['kind']}")
    for kind, c in report.get("rotation_choices", {}).items():
        if "refused" in c:
            lines.append(f"  --rotate {kind}: {c['refused']}")
            continue
        lines.append(f"  --rotate {kind}: {c['bytes'] / 2**20:.2f} MiB, {c['bpw']:.2f} bits/weight, KLD measured "
                     f"{c['kld_meas']:.5f}")
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


def read_plan(path: str | Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsmithError(f"cannot read the plan {path}: {exc}", where="--plan", fix="pass a plan from `bitsmith search`") from exc
    if data.get("format") != PLAN_FORMAT or not isinstance(data.get("weights"), dict):
        raise BitsmithError(f"{path} is not a bitsmith plan", where="--plan", fix="pass a plan from `bitsmith search`")
    return data


def plan_to_overrides(path: str | Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(keep patterns, scheme overrides) that make `compile` build exactly the plan in `path`; a scheme without a
    method (`int4-g32`) takes the plan's "method" (rtn), one with it (`int4-g32-hqq`) keeps its own."""
    data = read_plan(path)
    keep = tuple(n for n, s in data["weights"].items() if s == KEEP16)
    schemes = tuple((n, s if _names_method(s) else f"{s}-{data.get('method', 'rtn')}")
                    for n, s in data["weights"].items() if s != KEEP16)
    return keep, schemes


def plan_rotation(path: str | Path) -> tuple[str, int]:
    """(kind, seed) of the rotation the plan was searched under: `compile --rotate KIND --rotate-seed SEED`
    (plans from before rotation: none)."""
    rotation = read_plan(path).get("rotation") or {}
    return str(rotation.get("kind", "none")), int(rotation.get("seed", 0))


def _names_method(scheme: str) -> bool:
    return any(part in QUANTIZER_METHODS for part in scheme.split("-")[1:])
