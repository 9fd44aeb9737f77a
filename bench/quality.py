"""Quantization quality: RTN/GPTQ/AWQ x int8/int4/int3 on real models, with llm-compressor's GPTQ side by side.

For each model every scheme is compiled with `bitsmith compile` (a subprocess, so its peak RSS and
time are measured), then all artifacts are scored on the same windows by `bitsmith eval`'s code
against the unquantized model: perplexity, mean/p99 KL divergence, top-1 agreement, bytes.
Calibration text comes from a part of the file disjoint from the scored tokens (stated in the table).

    python bench/quality.py [--json] [--models tinystories,smollm2] [--methods rtn,gptq,awq] [--tokens N]
                            [--peer-venv DIR]

Writes bench/quality.md; --json also prints one JSON object. Both start with the host record
(bench/hostinfo.py: CPU, flags, streaming read bandwidth), since compile seconds depend on it.

--smoke: TinyStories-656K, RTN int4 g32 only, 2048 scored tokens, no file written unless --out: checks
that the bench still runs (tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo)
# are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
SEQLEN = 256  # tokens per calibration sample
METHODS = ("rtn", "gptq", "awq")


@dataclass(frozen=True)
class BenchModel:
    name: str
    source: str  # model path; "default" is the built-in SmolLM2 GGUF
    text: Path
    ctx: int
    calib_chars: tuple[int, int]  # slice of the same file used for calibration (disjoint from the scored part)
    peer_group: int  # group size the peer comparison uses (must divide every in_features)
    calib_samples: int  # x SEQLEN tokens: several times the widest in_features, so GPTQ's Hessian is well posed


MODELS = {
    "tinystories": BenchModel("TinyStories-656K", str(DATA / "tinystories-656k"),
                              DATA / "tinystories-valid-subset" / "tinystories_valid_head.txt", 256,
                              (400_000, 794_375), 64, 64),
    "smollm2": BenchModel("SmolLM2-135M", "default", DATA / "wikitext-2-raw-test" / "wiki.test.raw", 1024,
                          (700_000, 1_290_590), 64, 32),
}


def schemes_for(model: str) -> list[tuple[str, int, int, bool]]:
    """(label, bits, group, sym): int8 per channel, int4 g32/g64/g128 (per channel where 128 does not divide), int3 g32."""
    g128 = ("int4 g128", 4, 128, True) if model == "tinystories" else ("int4 per-channel", 4, -1, True)
    return [("int8 per-channel", 8, -1, True), ("int4 g32", 4, 32, True), ("int4 g64", 4, 64, True), g128,
            ("int3 g32", 3, 32, True)]


def compile_one(source: str, out: Path, method: str, bits: int, group: int, sym: bool, calib: Path,
                samples: int) -> dict:
    """Run `bitsmith compile` in a subprocess; returns wall seconds and peak RSS (MiB)."""
    cmd = [sys.executable, "-m", "bitsmith.cli", "compile", *([] if source == "default" else [source]),
           "-o", str(out), "--method", method, "--bits", str(bits), "--group", str(group),
           "--sym" if sym else "--asym", "--no-keep-default", "--calib", str(calib), "--target", "none",
           "--calib-samples", str(samples), "--calib-seqlen", str(SEQLEN), "--gate", "none"]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    err = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"compile failed: {' '.join(cmd)}\n{err[-2000:]}")
    return {"seconds": round(time.time() - t0, 1), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def gguf_as_hf_dir(gguf: Path, out: Path) -> Path:
    """An HF Llama directory (fp32 safetensors + config.json from ../shared/data) with the GGUF's weights."""
    import shutil

    import numpy as np
    from safetensors.numpy import save_file

    from bitsmith.compiler.frontends.gguf import load_gguf

    out.mkdir(parents=True)
    ckpt = load_gguf(gguf)
    save_file({f"model.{k}" if k != "lm_head.weight" else k: np.ascontiguousarray(v, dtype=np.float32)
               for k, v in ckpt.weights.items()}, str(out / "model.safetensors"))
    for name in ("config.json", "tokenizer.json"):  # llm-compressor builds its processor from the tokenizer
        shutil.copy(DATA / "smollm2-135m-instruct-q4_1" / name, out / name)
    # without tokenizer_config.json transformers asks the hub which tokenizer class to use
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    return out


def peer_row(model: BenchModel, source_path: Path, tokenizer, calib_ids, windows, venv: Path, group: int) -> dict:
    """llm-compressor GPTQ int4 sym on the same calibration samples and windows (its own venv)."""
    python = venv / "bin" / "python"
    if not python.exists():
        return {"error": f"peer venv {venv} missing: run bench/peers/setup_llmcompressor.sh {venv}"}
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = source_path
        if source_path.suffix == ".gguf":  # the peer needs an HF directory: write our dequantized weights as one
            hf_dir = gguf_as_hf_dir(source_path, Path(tmp) / "hf")
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps({"model": str(hf_dir), "calib": calib_ids.tolist(), "eval_windows": windows,
                                   "bits": 4, "group": group, "sym": True, "ignore": ["lm_head"]}))
        proc = subprocess.run([str(python), str(HERE / "peers" / "llmcompressor_gptq.py"), str(job)],
                              capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_model(key: str, tokens: int, venv: Path, work: Path, methods: tuple[str, ...] = METHODS,
                smoke: bool = False) -> dict:
    from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_samples
    from bitsmith.tools.evaluate import evaluate_many, windows_of
    from bitsmith.runtime.artifact import load_artifact

    model = MODELS[key]
    text = model.text.read_text(encoding="utf-8")
    calib = work / f"{key}-calib.txt"
    calib.write_text(text[slice(*model.calib_chars)])
    if model.source == "default":
        from bitsmith.compiler.default_model import default_model_path

        source_path = default_model_path()
    else:
        source_path = Path(model.source)
    rows, paths = [], []
    configs = [(m, *s) for m in methods for s in schemes_for(key) if not smoke or s[0] == "int4 g32"]
    if key == "smollm2" and "rtn" in methods and not smoke:  # sanity: asym int4 g32 reproduces the Q4_1 grid exactly (see the model's README)
        configs.append(("rtn", "int4 g32 asym (sanity)", 4, 32, False))
    for method, label, bits, group, sym in configs:
        out = work / f"{key}-{method}-{bits}-{group}-{'s' if sym else 'a'}"
        print(f"[{key}] compile {method} {label}", file=sys.stderr, flush=True)
        info = compile_one(str(source_path), out, method, bits, group, sym, calib, model.calib_samples)
        rows.append({"method": method, "scheme": label, "weight_bytes": load_artifact(out).manifest["weights"]["bytes"],
                     **info})
        paths.append(out)
    print(f"[{key}] scoring {len(paths)} artifacts", file=sys.stderr, flush=True)
    # the artifacts are compiled with --target none (no kernels: quality only), so they are scored on the
    # numpy reference executor, which since 1a350c9 must be asked for
    results = evaluate_many(paths, text, tokens, model.ctx, reference=source_path, executor="reference")
    for row, res in zip(rows, results):
        row.update({k: getattr(res, k) for k in ("ppl", "kld_mean", "kld_p99", "top1_agree")})
    ref_ppl, scored = results[0].ref_ppl, results[0].tokens
    # The peer: same model, calibration samples, windows and scheme (GPTQ int4 sym, group peer_group).
    tokenizer = load_artifact(paths[0]).tokenizer()
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    calib_ids = calibration_samples(tokenizer.encode(calib.read_text(), add_bos=False),
                                    CalibrationOptions(str(calib), model.calib_samples, SEQLEN), bos)
    windows = windows_of(tokenizer.encode(text, add_bos=False)[:tokens], model.ctx, bos)
    ours = next((r for r in rows if r["method"] == "gptq" and r["scheme"] == f"int4 g{model.peer_group}"), None)
    if ours is None:
        peer, ours = {"error": "not run (it is compared with our GPTQ, which --methods left out)"}, {"ppl": None}
    else:
        print(f"[{key}] peer llm-compressor", file=sys.stderr, flush=True)
        try:
            peer = peer_row(model, source_path, tokenizer, calib_ids, windows, venv, model.peer_group)
        except Exception as exc:  # the peer is best effort: report why it did not run, keep our numbers
            peer = {"error": f"{type(exc).__name__}: {exc}"}
    return {"model": model.name, "text": model.text.name, "ctx": model.ctx, "tokens": scored, "bos": bos is not None,
            "calibration": f"{model.calib_samples} x {SEQLEN} tokens from chars {model.calib_chars[0]}-{model.calib_chars[1]} "
                           "of the same file", "ref_ppl": ref_ppl, "rows": rows,
            "peer": {"name": "llm-compressor 0.14 GPTQModifier (CPU)", "scheme": f"int4 sym g{model.peer_group}",
                     **peer, "ours_ppl": ours["ppl"]}}


def write_markdown(report: dict, path: Path, host: dict) -> None:
    lines = ["# Quantization quality", "",
             "`python bench/quality.py --json` (2-core CPU; reference executor). Δppl relative to the unquantized model.",
             "Every linear weight is quantized (`--no-keep-default`); the tied embedding / lm_head stays 16-bit.", "",
             f"- {host_line(host)}", ""]
    for key, r in report.items():
        lines += [f"## {r['model']}: {r['tokens']:,} tokens of `{r['text']}`, ctx {r['ctx']}, "
                  f"BOS {'prepended' if r['bos'] else 'not used'}; reference PPL {r['ref_ppl']:.3f}", "",
                  f"Calibration: {r['calibration']}.", "",
                  "| method | scheme | PPL | Δppl | mean KLD | p99 KLD | top-1 agree | weight MiB | compile s | peak RSS MiB |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in r["rows"]:
            lines.append(f"| {row['method']} | {row['scheme']} | {row['ppl']:.3f} | {row['ppl'] - r['ref_ppl']:+.3f} | "
                         f"{row['kld_mean']:.4f} | {row['kld_p99']:.4f} | {row['top1_agree']:.4f} | "
                         f"{row['weight_bytes'] / 2**20:.2f} | {row['seconds']} | {row['peak_rss_mib']} |")
        p = r["peer"]
        peer_ppl = f"{p['ppl']:.3f}" if "ppl" in p else f"not run ({p.get('error')})"
        ours = "" if p["ours_ppl"] is None else f"; bitsmith GPTQ PPL {p['ours_ppl']:.3f}"
        lines += ["", f"Peer, same model/calibration/windows, {p['scheme']}: {p['name']} PPL {peer_ppl}{ours}.", ""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--models", default="tinystories,smollm2")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of rtn,gptq,awq")
    parser.add_argument("--tokens", type=int, default=32768, help="scored tokens per model")
    parser.add_argument("--smollm2-tokens", type=int, default=None, help="override --tokens for SmolLM2 only")
    parser.add_argument("--peer-venv", type=Path,
                        default=Path(os.environ.get("BITSMITH_PEER_VENV", Path.home() / ".cache/bitsmith/peer-venv")))
    parser.add_argument("--out", type=Path, default=None, help="markdown to write (default bench/quality.md)")
    parser.add_argument("--smoke", action="store_true", help="TinyStories, RTN int4 g32, 2048 tokens, no file")
    args = parser.parse_args()
    if not DATA.is_dir():
        raise SystemExit(f"error: {DATA} not found (real models and text live in ../shared/data)")
    if args.smoke:
        args.models, args.methods, args.tokens = "tinystories", "rtn", 2048
    with tempfile.TemporaryDirectory(prefix="bitsmith-quality-") as tmp:
        out = args.out or (Path(tmp) / "quality.md" if args.smoke else HERE / "quality.md")
        host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
        report = {}
        for key in args.models.split(","):
            tokens = args.smollm2_tokens if key == "smollm2" and args.smollm2_tokens else args.tokens
            report[key] = bench_model(key, tokens, args.peer_venv, Path(tmp), tuple(args.methods.split(",")),
                                      args.smoke)
            write_markdown(report, out, host)  # after each model, so a later failure loses nothing
        write_markdown(report, out, host)
        if args.json:
            print(json.dumps({"host": host, **report}))
        else:
            print(out.read_text())


if __name__ == "__main__":
    main()
