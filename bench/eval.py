"""The eval suites (`bitsmith eval --suite`) on SmolLM2-135M-Instruct: int8, int4 g32 GPTQ, int3 g32 GPTQ and the
imported Q4_1 default against the unquantized reference (the GGUF's Q4_1 weights, dequantized), in one table.

    python bench/eval.py [--workdir DIR] [--artifacts int8,int4g32,int3g32,q4_1] [--suites ppl,golden,json,needle,serve]
                         [--limit N] [--needle-lengths 256,512,1024,2048] [--out bench/eval.md] [--json]

Artifacts missing from --workdir are compiled first (`bitsmith compile`, timed). Every suite runs in this
process through tools/suites.run_suites, one artifact after another; per suite the wall time and the
reference's share of it are recorded, with the host (bench/hostinfo.py) and the load average before and after
each artifact. The shared reference is compiled once into ~/.cache/bitsmith/references (its compile time is the
first artifact's, reported separately).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ to the end of sys.path (hostinfo is found, bench/kernels.py shadows nothing); the repository first
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line  # noqa: E402

ARTIFACTS = {  # name -> (compile arguments, description)
    "int8": (["--requantize", "--method", "rtn", "--bits", "8", "--group", "128"], "int8 g128 RTN"),
    "int4g32": (["--requantize", "--method", "gptq", "--bits", "4", "--group", "32"], "int4 g32 GPTQ"),
    "int3g32": (["--requantize", "--method", "gptq", "--bits", "3", "--group", "32"], "int3 g32 GPTQ"),
    "q4_1": ([], "imported Q4_1 (default)"),
}


def compile_artifact(name: str, workdir: Path) -> dict:
    out = workdir / name
    if (out / "manifest.json").is_file():
        return {"compiled": False, "seconds": None}
    start = time.perf_counter()
    # --gate none: the requested scheme itself (a gate could fall back to another plan)
    subprocess.run([sys.executable, "-m", "bitsmith.cli", "compile", "-o", str(out), "--gate", "none",
                    *ARTIFACTS[name][0]],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return {"compiled": True, "seconds": time.perf_counter() - start}


def run_one(name: str, path: Path, suites: list[str], options) -> dict:
    from bitsmith.tools.suites import run_suites, save_results
    from bitsmith.tools.suites.reference import resolve_reference

    row: dict = {"name": name, "description": ARTIFACTS[name][1], "load_before": os.getloadavg()[0], "suites": {}}
    start = time.perf_counter()
    ref, _ = resolve_reference(path, None, log=lambda line: print(line, file=sys.stderr))
    row["reference_ready_s"] = time.perf_counter() - start
    manifest = json.loads((path / "manifest.json").read_text())
    ref_manifest = json.loads((ref / "manifest.json").read_text())
    params = sum(ref_manifest["weights"]["bytes_by_dtype"].values()) / 4  # the reference is float32 throughout
    row["weight_bytes"] = manifest["memory_plan"]["weights"]
    row["bpw"] = 8 * row["weight_bytes"] / params
    for suite in suites:
        print(f"[{name}] {suite} ...", file=sys.stderr, flush=True)
        result = run_suites(path, [suite], None, options)[suite]
        save_results(path, {suite: result})
        row["suites"][suite] = {"metrics": result.metrics, "seconds": result.seconds,
                                "reference_seconds": result.details.get("reference_seconds"),
                                "details": {k: v for k, v in result.details.items() if k != "prompts"}}
    row["load_after"] = os.getloadavg()[0]
    return row


def fmt(value, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[dict]) -> list[str]:
    head = ("| artifact | MB | bpw | kld | top1 | ppl (ref) | golden | golden_acc (ref) | json free (ref) | "
            "json constrained (ref) | needle (ref) | tok/s c16 (ref) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        m = {k: v for s in r["suites"].values() for k, v in s["metrics"].items()}
        lines.append(
            f"| {r['description']} | {r['weight_bytes'] / 1e6:.1f} | {r['bpw']:.2f} | {fmt(m.get('kld'), '.4f')} | "
            f"{fmt(m.get('top1'))} | {fmt(m.get('ppl'), '.2f')} ({fmt(m.get('ref_ppl'), '.2f')}) | "
            f"{fmt(m.get('golden'))} | {fmt(m.get('golden_acc'))} ({fmt(m.get('ref_golden_acc'))}) | "
            f"{fmt(m.get('json'))} ({fmt(m.get('ref_json'))}) | "
            f"{fmt(m.get('json_constrained'))} ({fmt(m.get('ref_json_constrained'))}) | "
            f"{fmt(m.get('needle'))} ({fmt(m.get('ref_needle'))}) | "
            f"{fmt(m.get('tok_s_c16'), '.0f')} ({fmt(m.get('ref_tok_s_c16'), '.0f')}) |")
    return lines


def cost_table(rows: list[dict], suites: list[str]) -> list[str]:
    lines = ["| artifact | " + " | ".join(f"{s} s (reference s)" for s in suites) + " | load before/after |",
             "|---|" + "---|" * len(suites) + "---|"]
    for r in rows:
        cells = [f"{r['suites'][s]['seconds']:.0f} ({fmt(r['suites'][s]['reference_seconds'], '.0f')})"
                 for s in suites]
        lines.append(f"| {r['description']} | " + " | ".join(cells) + f" | {r['load_before']:.1f} / "
                     f"{r['load_after']:.1f} |")
    return lines


def markdown(report: dict, suites: list[str]) -> str:
    rows, o = report["rows"], report["options"]
    compiles = ", ".join(f"{n} {c['seconds']:.0f} s" for n, c in report["compiles"].items() if c["compiled"])
    lines = [
        "# Eval suites on SmolLM2-135M-Instruct", "",
        f"`python bench/eval.py --out bench/eval.md` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).", "",
        host_line(report["host"]), "",
        "Every artifact against the same reference: the GGUF's Q4_1 weights dequantized, compiled unquantized "
        "(float32) with the artifact's context (2048) and kernels (`bitsmith eval --suite ...` builds it once into "
        "~/.cache/bitsmith/references). The reference's greedy outputs and bench speeds are measured once, for the "
        "first artifact, and reused (the same prompts give the same greedy tokens). "
        f"ppl: {o['tokens']} tokens of bitsmith/data/eval.txt in windows of 256, the "
        "reference on the numpy executor. golden: greedy through the chat template, "
        f"{o['max_tokens']} tokens; golden = share of prompts whose tokens equal the reference's. json: "
        f"{o['json_max_tokens']} tokens, free-running and constrained to the prompt's schema (llguidance). needle: "
        f"lengths {o['needle_lengths']} x depths {o['needle_depths']} x 3 facts. serve: `bitsmith bench` "
        f"levels {o['concurrency']} (prompt 128, output 64 tokens)."
        + (f" --limit {o['limit']}: the first {o['limit']} golden/json prompts and facts per needle cell."
           if o["limit"] else ""), "",
        "## Results (artifact, reference in parentheses)", "", *table(rows), "",
        "## What each suite cost (wall seconds, the reference's share in parentheses)", "", *cost_table(rows, suites),
        "", f"Artifacts compiled with `--gate none` (the requested scheme itself): {compiles or 'already present'}.",
        "", "The compile-time gate on these suites, and a run where int3 fails and the ladder ends at a passing "
        "plan: [bench/gate.md](gate.md).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bitsmith-bench-eval"))
    parser.add_argument("--artifacts", default="int8,int4g32,int3g32,q4_1")
    parser.add_argument("--suites", default="ppl,golden,json,needle,serve")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--needle-lengths", default="256,512,1024,2048")
    parser.add_argument("--tokens", type=int, default=4096, help="ppl: tokens of the held-out text.")
    parser.add_argument("--no-memo", action="store_true",
                        help="Rerun the reference for every artifact (default: its outputs and speeds are reused).")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--from-json", type=Path, default=None,
                        help="Render --out from a saved report (e.g. WORKDIR/eval-partial.json of a run cut short).")
    args = parser.parse_args()
    if args.from_json:
        report = json.loads(args.from_json.read_text())
        done = list(report["rows"][0]["suites"]) if report["rows"] else []
        args.out.write_text(markdown(report, done))
        return
    from bitsmith.tools.suites import SuiteOptions, generate

    if not args.no_memo:  # one reference for every artifact: its greedy outputs and bench speeds come once
        generate.MEMO = {}

    names, suites = args.artifacts.split(","), args.suites.split(",")
    options = SuiteOptions(limit=args.limit, tokens=args.tokens,
                           needle_lengths=tuple(int(n) for n in args.needle_lengths.split(",")))
    host = host_info()
    print(host_line(host), file=sys.stderr)
    args.workdir.mkdir(parents=True, exist_ok=True)
    compiles = {name: compile_artifact(name, args.workdir) for name in names}
    rows = []
    for name in names:  # each artifact's row is kept as it finishes (a long run cut short keeps its rows)
        rows.append(run_one(name, args.workdir / name, suites, options))
        (args.workdir / "eval-partial.json").write_text(json.dumps({"host": host, "options": options.to_json(),
                                                                   "compiles": compiles, "rows": rows}))
    report = {"host": host, "options": options.to_json(), "compiles": compiles, "rows": rows}
    if args.json:
        print(json.dumps(report))
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) if args.out.suffix == ".json" else markdown(report, suites))
    print("\n".join(table(rows) + [""] + cost_table(rows, suites)))


if __name__ == "__main__":
    main()
