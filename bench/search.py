"""Searched per-tensor plans vs uniform int4 and a llama.cpp Q4_K_M-style heuristic, at equal bits per weight,
unrotated and rotated.

    python bench/search.py [--json] [--models smollm2,tinystories]

For each model and rotation (none, hadamard): `bitsmith search` (sensitivity on the rotated model, kernel latency
table, ILP; RTN or HQQ per tensor) at exactly the bits per searched weight of the uniform int4-g32 plan and of the
heuristic (v_proj and down_proj at int8 in the first and last eighth of the layers and every third layer,
int4-g32 elsewhere, like Q4_K_M's Q6_K choices); each plan's KLD is measured against the 16-bit model on held-out
calibration windows (reference executor; the uniform and heuristic plans RTN, on the same rotated model). JSON
keys: searched_kld_at_uniform_bpw, searched_kld_at_heuristic_bpw, each also `..._rotated`, next to
uniform_int4_kld / heuristic_kld (and `_rotated`). A rotated tied model stores a 16-bit hidden x hidden head_norm (its
head stays tied): it is outside the bits per weight, in fixed_bytes_rotated. The plans at the uniform bpw are compiled with kernels and
their decode latency measured next to the prediction. The first search is timed cold (empty cache), the second
warm. Writes bench/search.md, headed by the host line (bench/hostinfo.py: CPU, flags, streaming read bandwidth;
--json has it under "host"), since search seconds and latencies depend on it.

--smoke: TinyStories-656K only, a small search (2 measured plans, 3 Pareto points, 2 calibration
samples), 8 decode steps once, no file written unless --out (tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo)
# are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line  # noqa: E402

DATA = Path(__import__("os").environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
MODELS = {"smollm2": (None, True, 2048), "tinystories": (DATA / "tinystories-656k", False, 256)}
SMOKE = {"measure": 2, "pareto_points": 3, "calib_samples": 2}  # --smoke's SearchOptions
DECODE_RUNS, DECODE_STEPS = 3, 32  # decode_ms: median of runs of steps (--smoke: 1 x 8)


def heuristic_plan(tensors: list[str], fixed: set[str], layers: int) -> dict[str, str]:
    eighth = max(1, layers // 8)
    special = {i for i in range(layers) if i < eighth or i >= layers - eighth or i % 3 == 0}
    plan = {}
    for t in tensors:
        m = re.match(r"layers\.(\d+)\.", t)
        if t in fixed:
            plan[t] = "16"
        elif m and int(m.group(1)) in special and ("v_proj" in t or "down_proj" in t):
            plan[t] = "int8-g128"
        else:
            plan[t] = "int4-g32"
    return plan


def decode_ms(plan_path: Path, source, work: Path, context: int) -> float:
    from bitsmith.options import RotationOptions
    from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession
    from bitsmith.search.run import plan_rotation, plan_to_overrides

    keep, schemes = plan_to_overrides(plan_path)
    kind, seed = plan_rotation(plan_path)
    # a directory per plan: the kernel library of an artifact compiled earlier at the same path would be the one
    # loaded (dlopen returns the library already open under that name)
    out = compile_model(source, work / f"chosen-{plan_path.stem}", CompileOptions(
        quant=QuantOptions("rtn", keep_default=False, keep=keep, schemes=schemes, requantize=kind != "none"),
        memory=MemoryOptions(context=min(context, 512), concurrency=1), rotation=RotationOptions(kind, seed)))
    session = CompiledSession(load_artifact(out))
    runs = []
    for _ in range(DECODE_RUNS):
        session.reset()
        logits = session.prefill([1, 2, 3, 4])[-1]
        t0 = time.perf_counter()
        for _ in range(DECODE_STEPS):
            logits = session.decode(int(np.argmax(logits)))
        runs.append((time.perf_counter() - t0) / DECODE_STEPS * 1e3)
    shutil.rmtree(out, ignore_errors=True)
    return float(np.median(runs))


def reference_plans(model, base, cache: Path, keep_default: bool) -> tuple[dict, dict, Callable[[dict], dict]]:
    """(uniform int4-g32 plan, heuristic plan, plan -> plan_stats), bytes and bpw from the search's cost model."""
    from bitsmith.passes.assign_precision import KEEP, AssignPrecision, linear_weights
    from bitsmith.runtime.quant_scheme import parse_scheme
    from bitsmith.search.cost import LatencyTable
    from bitsmith.search.run import build_search_model, plan_stats
    from bitsmith.search.sensitivity import Sensitivity

    tensors = linear_weights(model.module)
    fixed = {n for n, s in AssignPrecision(parse_scheme("int4"), keep_default).plan(model.module).items() if s is KEEP}
    layers = model.module["decode"].inputs[2][1].shape[0]
    sm = build_search_model(model.module, model.weights, base, Sensitivity({}, {}, 0), LatencyTable(cache))

    def stats(plan):
        picked = {t: next(c for c in sm.options[t] if c.scheme == plan[t]) for t in tensors}
        return plan_stats(sm, picked, 0.0)

    uniform = {t: ("16" if t in fixed else "int4-g32") for t in tensors}
    return uniform, heuristic_plan(tensors, fixed, layers), stats


def measured(model, plans: dict[str, dict], held: np.ndarray, kind: str, base) -> dict[str, float]:
    """RTN KLD of each fixed plan on the model rotated by `kind` (a rotated tied model's head_norm: 16-bit)."""
    from bitsmith.compiler.reference import upcast_weights
    from bitsmith.search.rotation import rotate_model
    from bitsmith.search.run import PlanScorer, compile_calibration

    scorer = PlanScorer(*rotate_model(model.module, upcast_weights(model.weights), kind, 0,
                                      compile_calibration(model, base)), held)
    return {name: scorer.kld(plan) for name, plan in plans.items()}


def bench_model(key: str, cache: Path, smoke: bool = False) -> dict:
    from bitsmith.compiler.loader import load_model
    from bitsmith.errors import BitsmithError
    from bitsmith.passes.canonicalize import canonical_model
    from bitsmith.search.run import SearchOptions, _calibration, run_search

    source, keep_default, context = MODELS[key]
    model = canonical_model(load_model(source))
    base = SearchOptions(memory=1 << 40, context=context, keep_default=keep_default, cache_dir=str(cache),
                         **(SMOKE if smoke else {}))
    uniform, heuristic, stats = reference_plans(model, base, cache, keep_default)
    targets = {"uniform": stats(uniform)["bpw"], "heuristic": stats(heuristic)["bpw"]}
    held = _calibration(model, base, seed=1)
    r: dict = {"uniform_bpw": targets["uniform"], "heuristic_bpw": targets["heuristic"], "searched_bpw": {},
               "methods": list(base.methods)}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("none", "hadamard"):  # each searched at exactly the reference plans' bits per searched weight
            suffix = "" if kind == "none" else "_rotated"
            for name, bpw in targets.items():
                t0 = time.time()
                report = run_search(source, SearchOptions(**{**base.__dict__, "bpw": bpw, "rotate": kind}),
                                    Path(tmp) / f"{name}{suffix}.json")
                r.setdefault("search_s", []).append(round(time.time() - t0, 1))
                r[f"searched_kld_at_{name}_bpw{suffix}"] = report["predicted"]["kld_meas"]
                print(f"[{key}] --rotate {kind} at the {name} plan's {bpw:.3f} bpw: KLD {report['predicted']['kld_meas']:.5f}"
                      f" ({r['search_s'][-1]} s)", file=sys.stderr, flush=True)
                r["searched_bpw"][f"{name}{suffix}"] = report["predicted"]["bpw"]
                if name == "uniform":
                    r[f"fixed_bytes{suffix}"] = report["fixed_bytes"]
                    r[f"spearman{suffix}"] = report["spearman"]
                    r[f"measured_plans{suffix}"] = sum("kld_meas" in p for p in report["pareto"])
                    r[f"chosen_schemes{suffix}"] = {s: list(report["weights"].values()).count(s)
                                                    for s in sorted(set(report["weights"].values()))}
                    r[f"latency_pred_ms{suffix}"] = report["predicted"]["latency_pred_ms"]
            fixed = measured(model, {"uniform": uniform, "heuristic": heuristic}, held, kind, base)
            r[f"uniform_int4_kld{suffix}"], r[f"heuristic_kld{suffix}"] = fixed["uniform"], fixed["heuristic"]
            print(f"[{key}] --rotate {kind}: uniform {fixed['uniform']:.5f}, heuristic {fixed['heuristic']:.5f}",
                  file=sys.stderr, flush=True)
        r["latency_meas_ms"] = decode_ms(Path(tmp) / "uniform.json", source, Path(tmp), context)
        try:  # the rotated artifact with kernels needs the online-Hadamard lowering
            r["latency_meas_ms_rotated"] = decode_ms(Path(tmp) / "uniform_rotated.json", source, Path(tmp), context)
        except BitsmithError as exc:
            r["latency_meas_ms_rotated"], r["latency_rotated_error"] = None, str(exc)[:200]
    # the first search is cold (sensitivity + kernel latencies), the second reuses both (same rotation)
    r["search_s_cold"], r["search_s_warm"] = r["search_s"][0], r["search_s"][1]
    r["bpw"], r["searched_kld"] = r["searched_bpw"]["uniform"], r["searched_kld_at_uniform_bpw"]  # names of before
    return r


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="tinystories,smollm2")
    parser.add_argument("--out", type=Path, default=None, help="markdown to write (default bench/search.md)")
    parser.add_argument("--smoke", action="store_true", help="TinyStories, a small search, no file")
    args = parser.parse_args()
    global DECODE_RUNS, DECODE_STEPS
    if args.smoke:
        args.models, DECODE_RUNS, DECODE_STEPS = "tinystories", 1, 8
    out = args.out or (None if args.smoke else HERE / "search.md")
    host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
    report = {}
    for key in args.models.split(","):
        cache = Path(tempfile.mkdtemp(prefix=f"bitsmith-search-{key}-"))  # cold cache for the timing
        print(f"[{key}] searching", file=sys.stderr, flush=True)
        try:
            report[key] = bench_model(key, cache, args.smoke)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        print(f"[{key}] {report[key]}", file=sys.stderr, flush=True)
    lines = ["# Bit-width search", "", "`python bench/search.py --json` (2-core CPU). KLD: mean per token vs the 16-bit "
             "model, measured on held-out calibration windows (reference executor). Uniform and heuristic plans are "
             "RTN; searched plans choose RTN or HQQ per tensor and are searched at exactly the uniform's and the "
             "heuristic's bits per searched weight (SearchOptions.bpw), unrotated and with `--rotate hadamard`.", "",
             f"- {host_line(host)}", "", table_equal_bpw(report), "", table_search(report)]
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"host": host, **report}))


def table_equal_bpw(report: dict) -> str:
    """One row per model and rotation: each reference plan next to the searched plan at its bits per weight."""
    rows = ["| model | rotation | uniform int4-g32 bpw | uniform KLD | searched KLD at uniform bpw | heuristic bpw "
            "| heuristic KLD | searched KLD at heuristic bpw |", "|---|---|" + "---:|" * 6]
    for key, r in report.items():
        for kind, sfx in (("none", ""), ("hadamard", "_rotated")):
            b = r["searched_bpw"]
            rows.append(f"| {key} | {kind} | {r['uniform_bpw']:.3f} | {r['uniform_int4_kld' + sfx]:.5f} | "
                        f"{r['searched_kld_at_uniform_bpw' + sfx]:.5f} ({b['uniform' + sfx]:.3f} bpw) | "
                        f"{r['heuristic_bpw']:.3f} | {r['heuristic_kld' + sfx]:.5f} | "
                        f"{r['searched_kld_at_heuristic_bpw' + sfx]:.5f} ({b['heuristic' + sfx]:.3f} bpw) |")
    return "\n".join(rows)


def table_search(report: dict) -> str:
    rows = ["| model | rotation | chosen at uniform bpw | latency pred / meas ms | Spearman (plans) | fixed MiB "
            "| search s |", "|---|---|---|---:|---:|---:|---:|"]
    for key, r in report.items():
        for kind, sfx in (("none", ""), ("hadamard", "_rotated")):
            meas = r["latency_meas_ms" + sfx]
            chosen = ", ".join(f"{n} {s}" for s, n in sorted(r["chosen_schemes" + sfx].items(), key=lambda x: -x[1]))
            seconds = " / ".join(str(x) for x in (r["search_s"][:2] if not sfx else r["search_s"][2:]))
            rows.append(f"| {key} | {kind} | {chosen} | {r['latency_pred_ms' + sfx]:.2f} / "
                        f"{'-' if meas is None else f'{meas:.2f}'} | {r['spearman' + sfx]} ({r['measured_plans' + sfx]}) "
                        f"| {r['fixed_bytes' + sfx] / 2**20:.2f} | {seconds} |")
    return "\n".join(rows)


if __name__ == "__main__":
    main()
