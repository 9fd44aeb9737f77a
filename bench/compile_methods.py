"""GPTQ and AWQ compile time and peak memory, ours next to llm-compressor's, same model and calibration tokens.

    python bench/compile_methods.py [--json] [--model HF_DIR] [--methods gptq,awq] [--bits 4] [--group 32]
                                    [--calib-samples 32] [--calib-seqlen 256] [--sides ours,peer]
                                    [--peer-venv DIR] [--peer-dtype float32] [--workdir DIR] [--keep]
                                    [--smoke] [--out FILE]

Model: --model, else a random Llama of SmolLM2-1.7B's shape written by bitsmith.tools.synthetic (bf16, 3.4 GB,
with the TinyStories tokenizer padded to its vocabulary so calibration text tokenizes) under --workdir.
Calibration: bitsmith's default text, cut by bitsmith into samples x seqlen tokens; the peer gets exactly those
token ids.
Ours: `bitsmith compile MODEL -o OUT --method M --bits 4 --group 32 --target none --calib-samples S
--calib-seqlen L` (symmetric, act_order, damp 0.01; lm_head and the first and last decoder layers kept 16-bit
by default). Peer: bench/peers/llmcompressor_compile.py in the llm-compressor venv (setup_llmcompressor.sh):
the model loaded in --peer-dtype (float32 by default: CPU torch has no fast bf16 path for every op, and our
calibration runs in float32 too), the same scheme, the same three modules ignored, saved compressed.
Each side is a subprocess: wall seconds, and peak RSS from wait4 (the child's ru_maxrss). Methods alternate
sides (ours gptq, peer gptq, ours awq, peer awq) so a slow spell of this shared host hits both; the 1-minute
load average before and after each run is recorded with it.
Disk: 3.4 GB for the generated model, 1.4 GB for our artifact, ~1.2 GB for the peer's saved model (each output
is deleted after its run).
--smoke: a 4-layer, 256-wide model (layers 1 and 2 quantized), 4 x 32 calibration tokens, the peer only if its venv exists, nothing kept.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line, run_measured  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
TOKENIZER = DATA / "tinystories-656k"
PEER_VENV = Path(os.environ.get("BITSMITH_PEER_VENV", Path.home() / ".cache" / "bitsmith" / "peer-venv"))
GB = 1e9


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def measured(cmd: list[str], timeout: float = 4 * 3600) -> dict[str, Any]:
    """Run cmd: wall seconds, peak RSS (hostinfo.run_measured: the child's own VmHWM), exit code, its stdout,
    the load around it."""
    before = load1()
    run = run_measured(cmd, timeout)
    code, tail = run["rc"], run["stderr"][-2000:]
    result = {"seconds": round(run["seconds"], 1), "peak_rss_gb": round(run["peak_kb"] * 1024 / GB, 2),
              "rc": code, "load_before": before, "load_after": load1()}
    if code:
        result["error"] = tail if code > 0 else f"killed by signal {-code}\n{tail}"
    return result | {"stdout": run["stdout"]}


def make_model(workdir: Path, smoke: bool) -> Path:
    from bitsmith.errors import BitsmithError
    from bitsmith.tools.synthetic import SHAPES, LlamaShape, write_padded_tokenizer, write_random_llama

    shape = LlamaShape(256, 4, 512, 4, 4, 2048, True, 2048) if smoke else SHAPES["smollm2-1.7b"]
    model = workdir / ("smoke" if smoke else "smollm2-1.7b") / "model"
    if (model / "bitsmith-synthetic.json").exists():
        return model
    if not (TOKENIZER / "tokenizer.json").exists():
        raise BitsmithError(f"no tokenizer at {TOKENIZER}", where="bench/compile_methods.py",
                            fix="set BITSMITH_DATA to the shared data (GPTQ/AWQ calibrate on tokenized text)")
    write_random_llama(model, shape, "bfloat16")
    write_padded_tokenizer(TOKENIZER, model, shape.vocab)
    return model


def calibration_ids(model: Path, samples: int, seqlen: int) -> list[list[int]]:
    """The token ids bitsmith calibrates on (its default text, its cutting), for the peer to use as they are."""
    from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_tokens
    from bitsmith.compiler.loader import load_model

    return calibration_tokens(load_model(model), CalibrationOptions(None, samples, seqlen)).tolist()


def ours(model: Path, out: Path, method: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [shutil.which("bitsmith") or "bitsmith", "compile", str(model), "-o", str(out), "--method", method,
           "--bits", str(args.bits), "--group", str(args.group), "--target", "none",
           "--calib-samples", str(args.calib_samples), "--calib-seqlen", str(args.calib_seqlen), "--gate", "none"]
    result = measured(cmd)
    result.pop("stdout")
    result["command"] = " ".join(["bitsmith", *cmd[1:]])
    shutil.rmtree(out, ignore_errors=True)
    return result


def peer(model: Path, method: str, calib: list[list[int]], layers: int, work: Path,
         args: argparse.Namespace) -> dict[str, Any]:
    python = args.peer_venv / "bin" / "python"
    if not python.exists():
        return {"skipped": f"peer venv {args.peer_venv} missing: run bench/peers/setup_llmcompressor.sh"}
    # what bitsmith keeps 16-bit by default: the lm_head and the first and last decoder layers
    ignore = ["lm_head", r"re:.*layers\.0\..*", rf"re:.*layers\.{layers - 1}\..*"]
    job = work / f"peer-{method}.json"
    job.write_text(json.dumps({"model": str(model), "calib": calib, "method": method, "bits": args.bits,
                               "group": args.group, "sym": True, "ignore": ignore, "dtype": args.peer_dtype,
                               "output": str(work / f"peer-{method}")}))
    result = measured([str(python), str(HERE / "peers" / "llmcompressor_compile.py"), str(job)])
    stdout = result.pop("stdout")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if not result["rc"] and lines:
        result["phases"] = json.loads(lines[-1])
    shutil.rmtree(work / f"peer-{method}", ignore_errors=True)
    return result


def peer_version(venv: Path) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    code = "import importlib.metadata as m; print(m.version('llmcompressor'), m.version('torch'), m.version('transformers'))"
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    if proc.returncode:
        return None
    llmc, torch, transformers = proc.stdout.split()
    return f"llmcompressor {llmc}, torch {torch}, transformers {transformers}"


def fmt(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def cell(result: dict[str, Any] | None, key: str) -> str:
    if result is None:
        return "not run"
    if result.get("skipped"):
        return "skipped"
    if result.get("rc"):
        return f"FAILED (rc {result['rc']})" if key == "seconds" else fmt(result.get(key))
    return fmt(result.get(key))


def table(report: dict[str, Any]) -> str:
    calib = f"{report['calib_samples']} x {report['calib_seqlen']}"
    lines = [host_line(report["host"]), f"peer: {report['peer'] or 'absent'} (model loaded as {report['peer_dtype']})",
             f"model: {report['model']}", "",
             "| method | ours s | ours peak RSS GB | peer s | peer peak RSS GB | calibration (samples x seqlen) | load avg ours / peer |",
             "|---|---:|---:|---:|---:|---|---|"]
    for method, r in report["methods"].items():
        o, p = r.get("ours"), r.get("peer")
        loads = " / ".join(f"{x['load_before']}-{x['load_after']}" if x and "load_before" in x else "n/a" for x in (o, p))
        lines.append(f"| {method} int{report['bits']} g{report['group']} | {cell(o, 'seconds')} | "
                     f"{cell(o, 'peak_rss_gb')} | {cell(p, 'seconds')} | {cell(p, 'peak_rss_gb')} | {calib} | {loads} |")
    for method, r in report["methods"].items():
        for side in ("ours", "peer"):
            x = r.get(side) or {}
            if x.get("rc"):
                lines.append(f"\n{side} {method} failed:\n{x['error'].strip()[-800:]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: a random 1.7B-shape Llama)")
    ap.add_argument("--methods", default="gptq,awq")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--sides", default="ours,peer", help="ours, peer or both (default)")
    ap.add_argument("--peer-venv", type=Path, default=PEER_VENV)
    ap.add_argument("--peer-dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the generated model and the outputs go; kept, so the model is reused next time "
                         "(default: a temp dir, deleted at the end unless --keep)")
    ap.add_argument("--keep", action="store_true", help="keep the temp workdir")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None, help="also write the report JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.calib_samples, args.calib_seqlen = 4, 32
    sides = args.sides.split(",")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitsmith-compile-methods-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        model = args.model or make_model(workdir, args.smoke)
        layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
        calib = calibration_ids(model, args.calib_samples, args.calib_seqlen)
        report: dict[str, Any] = {
            "host": host_info(probe=not args.smoke), "peer": peer_version(args.peer_venv), "peer_dtype": args.peer_dtype,
            "model": str(model), "bits": args.bits, "group": args.group, "calib_samples": args.calib_samples,
            "calib_seqlen": args.calib_seqlen, "methods": {}}
        for method in args.methods.split(","):
            r = report["methods"][method] = {}
            if "ours" in sides:
                r["ours"] = ours(model, workdir / f"ours-{method}", method, args)
            if "peer" in sides:
                r["peer"] = peer(model, method, calib, layers, workdir, args)
    finally:
        if not args.keep and args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else table(report))
    failed = [f"{m} {side}" for m, r in report["methods"].items() for side, x in r.items() if side == "ours" and x["rc"]]
    if failed:
        raise SystemExit(f"bitsmith failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
