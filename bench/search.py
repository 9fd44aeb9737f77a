"""Searched per-tensor plans vs uniform int4 and a llama.cpp Q4_K_M-style heuristic, at the same bits per weight.

    python bench/search.py [--json] [--models smollm2,tinystories]

For each model: `bitsmith search` (sensitivity, kernel latency table, ILP) at the memory of the uniform
int4-g32 plan and at that of the heuristic (v_proj and down_proj at int8 in the first and last eighth
of the layers and every third layer, int4-g32 elsewhere, like Q4_K_M's Q6_K choices); each plan's KLD
is measured against the 16-bit model on held-out calibration windows (reference executor, RTN).
The chosen plan is compiled with kernels and its decode latency measured next to the prediction.
The search is timed cold (empty cache) and warm. Writes bench/search.md, headed by the host line
(bench/hostinfo.py: CPU, flags, streaming read bandwidth; --json has it under "host"), since search
seconds and latencies depend on it.

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
    from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession
    from bitsmith.search.run import plan_to_overrides

    keep, schemes = plan_to_overrides(plan_path)
    out = compile_model(source, work / "chosen", CompileOptions(
        quant=QuantOptions("rtn", keep_default=False, keep=keep, schemes=schemes),
        memory=MemoryOptions(context=min(context, 512), concurrency=1)))
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


def bench_model(key: str, cache: Path, smoke: bool = False) -> dict:
    from bitsmith.compiler.loader import load_model
    from bitsmith.passes.canonicalize import canonical_model
    from bitsmith.passes.assign_precision import KEEP, AssignPrecision, linear_weights
    from bitsmith.runtime.quant_scheme import parse_scheme
    from bitsmith.search.cost import LatencyTable
    from bitsmith.search.run import (SearchOptions, _calibration, build_search_model, measured_kld, plan_stats,
                                     run_search)
    from bitsmith.search.sensitivity import Sensitivity

    source, keep_default, context = MODELS[key]
    model = canonical_model(load_model(source))
    tensors = linear_weights(model.module)
    fixed = {n for n, s in AssignPrecision(parse_scheme("int4"), keep_default).plan(model.module).items() if s is KEEP}
    layers = model.module["decode"].inputs[2][1].shape[0]
    base = SearchOptions(memory=1 << 40, context=context, keep_default=keep_default, cache_dir=str(cache),
                         **(SMOKE if smoke else {}))
    # bytes of the reference plans, from the same cost model the search uses
    dummy = Sensitivity({t: {s: 0.0 for s in ("16", "int8-g128", "int4-g32", "int4-g64", "int4-g128", "int3-g32",
                                              "int2-g32")} for t in tensors}, {}, 0)
    sm = build_search_model(model, base, dummy, LatencyTable(cache))
    uniform = {t: ("16" if t in fixed else "int4-g32") for t in tensors}
    heuristic = heuristic_plan(tensors, fixed, layers)

    def stats(plan):
        picked = {t: next(c for c in sm.options[t] if c.scheme == plan[t]) for t in tensors}
        return plan_stats(sm, picked, 0.0)

    results = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        searched_u = run_search(source, SearchOptions(**{**base.__dict__, "memory": stats(uniform)["bytes"]}),
                                Path(tmp) / "u.json")
        cold = time.time() - t0
        t1 = time.time()
        searched_h = run_search(source, SearchOptions(**{**base.__dict__, "memory": stats(heuristic)["bytes"]}),
                                Path(tmp) / "h.json")
        warm = time.time() - t1
        held = _calibration(model, base, seed=1)
        from bitsmith.compiler.reference import upcast_weights

        weights = upcast_weights(model.weights)
        uniform_kld = measured_kld(model.module, weights, uniform, held)
        heuristic_kld = measured_kld(model.module, weights, heuristic, held)
        latency_meas = decode_ms(Path(tmp) / "u.json", source, Path(tmp), context)
        results = {
            "bpw": searched_u["predicted"]["bpw"], "uniform_bpw": stats(uniform)["bpw"],
            "searched_kld": searched_u["predicted"]["kld_meas"], "uniform_int4_kld": uniform_kld,
            "heuristic_bpw": stats(heuristic)["bpw"], "heuristic_kld": heuristic_kld,
            "searched_kld_at_heuristic_bpw": searched_h["predicted"]["kld_meas"],
            "latency_pred_ms": searched_u["predicted"]["latency_pred_ms"], "latency_meas_ms": latency_meas,
            "spearman": searched_u["spearman"], "measured_plans": sum("kld_meas" in p for p in searched_u["pareto"]),
            "search_s_cold": round(cold, 1), "search_s_warm": round(warm, 1),
            "chosen_schemes": {s: list(searched_u["weights"].values()).count(s) for s in set(searched_u["weights"].values())},
        }
    return results


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
             "model, measured on held-out calibration windows (RTN plans, reference executor).", "",
             f"- {host_line(host)}", "",
             "| model | bpw | searched KLD | uniform int4-g32 KLD | heuristic bpw | heuristic KLD | searched KLD at heuristic bpw "
             "| latency pred / meas ms | Spearman (plans) | search s cold / warm |", "|---|" + "---:|" * 9]
    for key, r in report.items():
        lines.append(f"| {key} | {r['bpw']:.2f} (uniform {r['uniform_bpw']:.2f}) | {r['searched_kld']:.5f} | "
                     f"{r['uniform_int4_kld']:.5f} | {r['heuristic_bpw']:.2f} | {r['heuristic_kld']:.5f} | "
                     f"{r['searched_kld_at_heuristic_bpw']:.5f} | {r['latency_pred_ms']:.2f} / {r['latency_meas_ms']:.2f} | "
                     f"{r['spearman']} ({r['measured_plans']}) | {r['search_s_cold']} / {r['search_s_warm']} |")
    if out is not None:
        out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        keys = ("bpw", "searched_kld", "uniform_int4_kld", "heuristic_kld", "latency_pred_ms", "latency_meas_ms",
                "spearman")
        print(json.dumps({"host": host, **{k: {f: v[f] for f in keys} for k, v in report.items()}}))


if __name__ == "__main__":
    main()
