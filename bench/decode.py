"""SmolLM2-135M decode tokens/s at batch 1: bitsmith's compiled kernels vs llama.cpp, next to the bandwidth limit.

    python bench/decode.py [--json] [--tokens 64] [--llamacpp-venv DIR]

For int4, int8 and 16-bit weights: compile the default model (SmolLM2-135M-Instruct Q4_1 GGUF) with
`bitsmith compile` (RTN, every linear at the stated bits; the tied embedding/lm_head stays fp16), prefill a short
prompt, then time greedy decode steps (median of 3 runs). llama.cpp (llama-cpp-python, 2 threads)
runs the same GGUF converted to the closest type (Q4_0 / Q8_0 / F16; its tied output matrix stays Q8_0) in its own venv
(bench/peers/setup_llamacpp.sh). The limit is bytes read per token (weights the step reads + the
KV cache at the mean position) over the machine's measured read bandwidth (bench/kernels.py).
Writes bench/decode.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PROMPT = "Once upon a time, in a small village by the sea, there lived"
CONFIGS = {  # ours: compile flags (int8 activations, as llama.cpp's q8 activations); llama.cpp: the closest type
    "int4": {"flags": ["--method", "rtn", "--bits", "4", "--group", "32", "--activations", "auto"], "llamacpp": "q4_0"},
    "int4_exact": {"flags": ["--method", "rtn", "--bits", "4", "--group", "32", "--activations", "float32"],
                   "llamacpp": "q4_0"},
    "int8": {"flags": ["--method", "rtn", "--bits", "8", "--group", "32", "--activations", "auto"], "llamacpp": "q8_0"},
    "fp": {"flags": ["--dtype", "float16"], "llamacpp": "f16"},
}
COMMON = ["--no-keep-default", "--context", "512", "--concurrency", "1"]  # every linear at the stated bits


def compile_artifact(out: Path, flags: list[str]) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "bitsmith.cli", "compile", "-o", str(out), *flags,
                    *(COMMON if "--method" in flags else COMMON[1:])],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def decode_rate(path: Path, tokens: int, runs: int = 3) -> tuple[float, int]:
    """Median tokens/s of `tokens` greedy decode steps after a prefill; also the weight bytes a step reads."""
    import numpy as np

    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.interleave import X16
    from bitsmith.runtime.session import CompiledSession

    artifact = load_artifact(path)
    prompt = artifact.tokenizer().encode(PROMPT)
    session = CompiledSession(artifact, len(prompt) + tokens + 1)
    rates = []
    for _ in range(runs):
        session.reset()
        logits = session.prefill(prompt)[-1]
        t0 = time.perf_counter()
        for _ in range(tokens):
            logits = session.decode(int(np.argmax(logits)))
        rates.append(tokens / (time.perf_counter() - t0))
    step = session.runner.steps[0].schedule
    used = {ref for c in step.calls for kind, ref, *_ in c.args if kind == "weight"}
    # an interleaved copy ("<name>@x16...", built at load) has the bytes of the artifact weight it comes from
    weight_bytes = sum(artifact.weights[n.split(X16)[0]].nbytes for n in used)
    # the embedding lookup reads one row, not the table (unless the table is also the lm_head)
    embed = next(ref for c in step.calls if c.kernel.startswith("embedding") for kind, ref, *_ in c.args if kind == "weight")
    lm_head_reads_table = sum(1 for c in step.calls for kind, ref, *_ in c.args if kind == "weight" and ref == embed) > 1
    if not lm_head_reads_table:
        weight_bytes -= artifact.weights[embed].nbytes
    kv_bytes = len(session.runner.pools) * session.runner.pools[0][0].nbytes / session.runner.block_size * (len(prompt) + tokens // 2)
    return statistics.median(rates), weight_bytes + kv_bytes


def llamacpp_rate(kind: str, tokens: int) -> dict:
    """llama.cpp batch-1 decode tok/s on SmolLM2 converted to `kind` (bench/peers/llamacpp_decode.py)."""
    from peers.llamacpp_decode import PeerUnavailable, convert, decode_tok_s, smollm2_variant

    try:
        path = smollm2_variant(kind)
        if not path.exists():
            convert(smollm2_variant("q4_1"), path, kind)
        result = decode_tok_s(path, tokens=tokens, runs=5, prompt=PROMPT)
        return {"tok_s": round(result["decode_tok_s"], 1)}
    except PeerUnavailable as exc:
        return {"error": str(exc)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=HERE / "decode.md")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from kernels import read_bandwidth

    bandwidth = read_bandwidth()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            cfg = CONFIGS[key]
            out = Path(tmp) / key
            compile_s = compile_artifact(out, cfg["flags"])
            ours, bytes_per_token = decode_rate(out, args.tokens)
            peer = llamacpp_rate(cfg["llamacpp"], args.tokens)
            report[key] = {"ours_tok_s": round(ours, 1), "llamacpp_tok_s": peer.get("tok_s"),
                           "ours_flags": " ".join(cfg["flags"]),
                           "llamacpp_type": cfg["llamacpp"], "llamacpp_error": peer.get("error"),
                           "limit_tok_s": round(bandwidth * 1e9 / bytes_per_token, 1),
                           "bytes_per_token": bytes_per_token, "compile_s": round(compile_s, 1)}
            print(f"[{key}] {report[key]}", file=sys.stderr, flush=True)
    lines = ["# Decode speed: SmolLM2-135M-Instruct, batch 1", "",
             f"`python bench/decode.py --json` ({args.tokens} greedy tokens after a {len(PROMPT.split())}-word prompt, "
             f"median of 3; read bandwidth measured in the same run: {bandwidth:.1f} GB/s).", "",
             "| weights | ours tok/s | llama.cpp tok/s (type) | limit tok/s | MB read per token | ours / llama.cpp |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, r in report.items():
        peer = f"{r['llamacpp_tok_s']} ({r['llamacpp_type']})" if r["llamacpp_tok_s"] else f"n/a: {r['llamacpp_error']}"
        ratio = f"{r['ours_tok_s'] / r['llamacpp_tok_s']:.2f}" if r["llamacpp_tok_s"] else "-"
        lines.append(f"| {key} | {r['ours_tok_s']} | {peer} | {r['limit_tok_s']} | {r['bytes_per_token'] / 1e6:.1f} | {ratio} |")
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        print(json.dumps({k: {"ours_tok_s": v["ours_tok_s"], "llamacpp_tok_s": v["llamacpp_tok_s"],
                              "limit_tok_s": v["limit_tok_s"]} for k, v in report.items()}))


if __name__ == "__main__":
    main()
