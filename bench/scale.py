"""Real-size checkpoints on this machine: compile time and peak memory, load time, serving memory, decode and
prefill speed, for random Llamas of SmolLM2-1.7B's and Llama-3-8B's shapes; llama.cpp in the same run.

    python bench/scale.py [--json] [--shapes smollm2-1.7b,llama3-8b] [--decode-shapes smollm2-1.7b]
                          [--methods rtn,gptq] [--workdir DIR] [--keep] [--rounds 5] [--tokens 64]
                          [--prefill 512] [--no-peer] [--smoke] [--out FILE]

Models: bitsmith.tools.synthetic writes each checkpoint itself (nothing is downloaded): bf16 safetensors in
2 GB shards, one chunk of random values in memory at a time, with the TinyStories tokenizer padded to the
vocabulary (llama.cpp's converter needs a tokenizer whose size matches). Disk: 1.7B: 3.4 GB checkpoint +
3.4 GB llama.cpp f16 GGUF + 1.0/1.8 GB Q4_0/Q8_0 + 1.4/2.0 GB of our artifacts; 8B: 16 GB + 16 GB + 4.7 GB +
~5 GB: about 52 GB free under --workdir for both shapes. Everything under --workdir is deleted at the end
unless --keep (a kept checkpoint is reused by the next run).

Compile (each a subprocess; seconds and its peak RSS from wait4):
  ours int4: `bitsmith compile --method rtn --bits 4 --group 32 --no-keep-default --scheme lm_head=int8
             --activations auto` (every decoder linear int4 g32: Q4_0's 4.5 bits/weight; the lm_head int8)
  ours int8: the same at --bits 8 (decode shapes only);  ours gptq: --method gptq --bits 4 --group 32 --target none
  llama.cpp: convert_hf_to_gguf.py --outtype f16 (from the llama-cpp-python sdist), then llama_model_quantize
             to Q4_0 (and Q8_0): its usual per-tensor choices (the tied token_embd/output matrix Q6_K).
Serving (decode shapes): both sides stay loaded in their own process; rounds are INTERLEAVED (ours, peer,
ours, peer, ...) and each side reports the median of its rounds. Decode: 64 greedy tokens after a short
prompt; prefill: one 512-token prompt. Serving RSS is the process's VmRSS after its runs; ours is checked
against the prediction `bitsmith inspect` prints (bitsmith/runtime/memory.py).
--smoke: a 2-layer, 256-wide model, RTN only, one round, peer skipped when absent, nothing written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line, llamacpp_build, llamacpp_line, run_measured, status_kb  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
TOKENIZER = DATA / "tinystories-656k"
SHORT_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play"
STORY = ("Once upon a time, there was a little dog named Max. Max liked to run in the park with his friend Sue. "
         "One day they found a big red ball under a tree, and they played with it until the sun went down. ")
OURS = {
    "int4": ["--method", "rtn", "--bits", "4", "--group", "32", "--no-keep-default", "--scheme", "lm_head=int8",
             "--activations", "auto"],
    "int8": ["--method", "rtn", "--bits", "8", "--group", "32", "--no-keep-default", "--activations", "auto"],
    "gptq": ["--method", "gptq", "--bits", "4", "--group", "32", "--target", "none"],
}
PEER_TYPE = {"int4": "q4_0", "int8": "q8_0"}
GB = 1e9


def measured(cmd: list[str], timeout: float = 7200) -> dict[str, Any]:
    """Run cmd; its wall seconds and peak RSS (hostinfo.run_measured: the child's own VmHWM)."""
    run = run_measured(cmd, timeout)
    result = {"seconds": round(run["seconds"], 1), "peak_rss_gb": round(run["peak_kb"] * 1024 / GB, 3),
              "rc": run["rc"]}
    if run["rc"]:
        result["error"] = run["stderr"][-1500:]
    return result


def vm_rss_gb(pid: int) -> float | None:
    kb = status_kb(pid, "VmRSS")
    return None if kb is None else round(kb * 1024 / GB, 3)


# ------------------------------------------------------------------------------------------------ models
def make_model(shape_name: str, workdir: Path, smoke: bool) -> tuple[Path, dict[str, Any]]:
    from bitsmith.tools.synthetic import SHAPES, LlamaShape, write_padded_tokenizer, write_random_llama

    shape = LlamaShape(256, 2, 512, 4, 4, 2048, True, 2048) if smoke else SHAPES[shape_name]
    model = workdir / shape_name / "model"
    info = {"shape": shape.__dict__, "parameters": shape.parameters()}
    if (model / "bitsmith-synthetic.json").exists():
        return model, info | {"generated_s": None}
    t0 = time.perf_counter()
    write_random_llama(model, shape, "bfloat16")
    if (TOKENIZER / "tokenizer.json").exists():
        write_padded_tokenizer(TOKENIZER, model, shape.vocab)
    return model, info | {"generated_s": round(time.perf_counter() - t0, 1)}


def ours_compile(model: Path, out: Path, config: str, smoke: bool) -> dict[str, Any]:
    flags = OURS[config] + (["--context", "1024"] if config != "gptq" else [])
    if config == "gptq" and smoke:
        flags += ["--calib-samples", "2", "--calib-seqlen", "32"]
    result = measured([shutil.which("bitsmith") or "bitsmith", "compile", str(model), "-o", str(out), *flags,
                       "--gate", "none"])
    if not result["rc"]:
        result["artifact_gb"] = round(sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) / GB, 3)
        kernels = json.loads((out / "manifest.json").read_text()).get("kernels") or {}
        result["kernel_build_s"] = kernels.get("build", {}).get("seconds", 0.0)  # 0 when cached: the rest is weights
    return result


def peer_convert(model: Path, work: Path) -> tuple[Path | None, dict[str, Any]]:
    from peers.llamacpp_decode import PeerUnavailable, venv_python

    build = llamacpp_build()
    if not build["runs_here"]:
        return None, {"error": build["why"]}
    converter = build.get("convert")
    try:
        python = venv_python()
    except PeerUnavailable as exc:
        return None, {"error": str(exc)}
    if not converter or not Path(converter).exists() or not (model / "tokenizer.json").exists():
        return None, {"error": "no convert_hf_to_gguf.py in llamacpp.env, or the model has no tokenizer"}
    f16 = work / "peer.f16.gguf"
    result = measured([str(python), converter, str(model), "--outfile", str(f16), "--outtype", "f16"])
    return (f16 if not result["rc"] else None), result


def peer_quantize(f16: Path, kind: str, work: Path) -> tuple[Path | None, dict[str, Any]]:
    from peers.llamacpp_decode import venv_python

    out = work / f"peer.{kind}.gguf"
    result = measured([str(venv_python()), str(HERE / "peers" / "llamacpp_decode.py"), "quantize", str(f16), str(out),
                       "--type", kind])
    if not result["rc"]:
        result["gguf_gb"] = round(out.stat().st_size / GB, 3)
    return (out if not result["rc"] else None), result


# ------------------------------------------------------------------------------------------------ serving
def serve_ours(artifact: str, prefill: int, tokens: int) -> None:
    """The `_serve` subcommand: load once, print {"ready"}, then per `decode`/`prefill` line one JSON result."""
    import numpy as np

    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession

    t0 = time.perf_counter()
    art = load_artifact(artifact, check_hashes=False)
    session = CompiledSession(art)
    load_s = time.perf_counter() - t0
    tok = art.tokenizer()
    short = tok.encode(SHORT_PROMPT)
    long_prompt = tok.encode(long_text(tok, prefill))
    print(json.dumps({"ready": {"load_s": round(load_s, 2), "rss_gb": vm_rss_gb(os.getpid()),
                                "short_prompt_tokens": len(short), "long_prompt_tokens": len(long_prompt)}}), flush=True)
    for line in sys.stdin:
        session.reset()
        if line.strip() == "decode":
            token = int(np.argmax(session.prefill_last(short)))
            t0 = time.perf_counter()
            for _ in range(tokens):
                token = int(np.argmax(session.decode(token)))
            result = {"decode_tok_s": tokens / (time.perf_counter() - t0)}
        else:
            t0 = time.perf_counter()
            session.prefill_last(long_prompt)
            result = {"prefill_tok_s": len(long_prompt) / (time.perf_counter() - t0)}
        print(json.dumps(result | {"rss_gb": vm_rss_gb(os.getpid())}), flush=True)


def long_text(tokenizer: Any, tokens: int) -> str:
    """The story repeated and cut at a word so that it is at most `tokens` tokens (llama.cpp evaluates a prompt
    in one batch of at most 512: a longer one aborts it)."""
    words = (STORY * (2 + tokens // 20)).split()
    low, high = 1, len(words)
    while low < high:  # the most words that fit
        mid = (low + high + 1) // 2
        if len(tokenizer.encode(" ".join(words[:mid]))) <= tokens:
            low = mid
        else:
            high = mid - 1
    return " ".join(words[:low])


def serving(artifact: Path, gguf: Path | None, args: argparse.Namespace) -> dict[str, Any]:
    """Interleaved decode rounds, then interleaved prefill rounds, ours vs llama.cpp; load seconds and RSS."""
    from peers.lineproc import LineProcess
    from peers.llamacpp_decode import DecodeServer, PeerUnavailable

    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.memory import serving_memory

    predicted = serving_memory(load_artifact(artifact, check_hashes=False))
    ours = LineProcess([sys.executable, str(Path(__file__).resolve()), "_serve", str(artifact), str(args.prefill),
                        str(args.tokens)], label="bitsmith serve")
    out: dict[str, Any] = {"ours": {"ready": ours.read(900)["ready"], "predicted_rss_gb": {k: round(v / GB, 3)
                                                                              for k, v in predicted.items()}}}
    story = long_text(load_artifact(artifact, check_hashes=False).tokenizer(), args.prefill)
    for mode, prompt, tokens in (("decode", SHORT_PROMPT, args.tokens), ("prefill", story, 1)):
        peer = None
        if gguf is not None:
            try:
                t0 = time.perf_counter()
                peer = DecodeServer(gguf, tokens=tokens, prompt=prompt, omp_wait_policy="passive")
                out.setdefault("peer", {})[f"{mode}_ready"] = peer.ready() | {
                    "load_s": round(time.perf_counter() - t0, 2)}
            except PeerUnavailable as exc:
                out.setdefault("peer", {})["error"] = str(exc)
        ours_runs, peer_runs = [], []
        for _ in range(args.rounds):
            ours_runs.append(ours.ask(mode, 1800))
            if peer is not None:
                try:
                    peer_runs.append(peer.run(1800))
                except PeerUnavailable as exc:
                    out["peer"][f"{mode}_error"] = str(exc)[-600:]
                    peer = None
        key = f"{mode}_tok_s"
        out["ours"][key] = round(statistics.median(r[key] for r in ours_runs), 2)
        out["ours"]["rss_gb"] = ours_runs[-1]["rss_gb"]
        if peer is not None and peer_runs:
            peer_key = "decode_tok_s" if mode == "decode" else "prompt_tok_s"
            out["peer"][key] = round(statistics.median(r[peer_key] for r in peer_runs), 2)
            out["peer"]["rss_gb"] = vm_rss_gb(peer.io.proc.pid)
            peer.close()
    ours.close()
    return out


# ------------------------------------------------------------------------------------------------ the run
def run_shape(shape_name: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    smoke = args.smoke
    model, result = make_model(shape_name, workdir, smoke)
    work = model.parent
    configs = ["int4"] + (["int8"] if shape_name in args.decode_shapes else []) + \
        (["gptq"] if "gptq" in args.methods and shape_name == "smollm2-1.7b" or smoke and "gptq" in args.methods else [])
    result["ours"] = {c: ours_compile(model, work / f"ours.{c}", c, smoke) for c in configs}
    f16 = None
    if not args.no_peer:
        f16, result["peer_convert"] = peer_convert(model, work)
    result["peer"] = {}
    for config in [c for c in configs if c in PEER_TYPE]:
        gguf = None
        if f16 is not None:
            gguf, result["peer"][config] = peer_quantize(f16, PEER_TYPE[config], work)
        if shape_name in args.decode_shapes and not result["ours"][config]["rc"]:
            result.setdefault("serving", {})[config] = serving(work / f"ours.{config}", gguf, args)
    if f16 is not None:
        f16.unlink(missing_ok=True)  # the biggest file; the quantized ones are kept with --keep
    return result


def fmt(value: Any, unit: str = "") -> str:
    return "n/a" if value is None else f"{value}{unit}"


def table(report: dict[str, Any]) -> str:
    lines = [host_line(report["host"]), llamacpp_line(report["llamacpp"]), "",
             "| shape | what | ours s (of which kernel builds) | ours peak RSS GB | llama.cpp s | llama.cpp peak RSS GB |",
             "|---|---|---:|---:|---:|---:|"]
    for shape, r in report["shapes"].items():
        conv = r.get("peer_convert") or {}
        for config, ours in r["ours"].items():
            peer = r["peer"].get(config, {})
            peer_s = f"{peer.get('seconds')} (+{conv.get('seconds')} convert)" if peer.get("seconds") else "n/a"
            ours_s = (f"{ours['seconds']} ({ours['kernel_build_s']})" if not ours["rc"]
                      else f"FAILED ({ours['error'].strip().splitlines()[-1]})")
            lines.append(f"| {shape} | compile {config} | {ours_s} | {fmt(ours.get('peak_rss_gb'))}"
                         f" | {peer_s} | {fmt(peer.get('peak_rss_gb'))} |")
    lines += ["", "| shape | weights | ours decode tok/s | llama.cpp decode tok/s | ours prefill tok/s (tokens) | "
              "llama.cpp prefill tok/s (tokens) | ours load s | llama.cpp load s | ours RSS GB (predicted full/loaded) | llama.cpp RSS GB |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for shape, r in report["shapes"].items():
        for config, s in r.get("serving", {}).items():
            o, p = s["ours"], s.get("peer", {})
            pred = o["predicted_rss_gb"]
            peer_prompt = (p.get("prefill_ready") or {}).get("ready", {}).get("prompt_tokens")
            lines.append(f"| {shape} | {config} vs {PEER_TYPE[config]} | {fmt(o.get('decode_tok_s'))} | "
                         f"{fmt(p.get('decode_tok_s'))} | {fmt(o.get('prefill_tok_s'))} ({o['ready']['long_prompt_tokens']})"
                         f" | {fmt(p.get('prefill_tok_s'))} ({fmt(peer_prompt)})"
                         f" | {o['ready']['load_s']} | {fmt((p.get('decode_ready') or {}).get('load_s'))} | {fmt(o.get('rss_gb'))} ({pred['full']}/{pred['loaded']}) | "
                         f"{fmt(p.get('rss_gb'))} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve_ours(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--shapes", default="smollm2-1.7b,llama3-8b")
    ap.add_argument("--decode-shapes", default="smollm2-1.7b")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--workdir", default=None, help="where models and artifacts go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep --workdir's files (a kept model is reused)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=None, help="also write the report JSON here")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.decode_shapes, args.rounds, args.tokens, args.prefill = "smoke", "smoke", 1, 4, 32
        args.methods = "rtn"
    args.decode_shapes = args.decode_shapes.split(",")
    args.methods = args.methods.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="bitsmith-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"host": host_info(probe=not args.smoke), "llamacpp": llamacpp_build(), "shapes": {}}
    try:
        for shape in args.shapes.split(","):
            report["shapes"][shape] = run_shape(shape, args, workdir)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1) if args.json else table(report))
    failed = [f"{shape} {config}" for shape, r in report["shapes"].items() for config, o in r["ours"].items() if o["rc"]]
    if failed:
        raise SystemExit(f"bitsmith failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
