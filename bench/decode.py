"""SmolLM2-135M decode tokens/s at batch 1: bitsmith's compiled kernels vs llama.cpp, next to the bandwidth limit.

    python bench/decode.py [--json] [--tokens 64] [--llamacpp-venv DIR]

For int4, int8 and 16-bit weights: compile the default model (SmolLM2-135M-Instruct Q4_1 GGUF) with
`bitsmith compile` (RTN; first/last layers and lm_head kept 16-bit, as shipped), prefill a short
prompt, then time greedy decode steps (median of 3 runs). llama.cpp (llama-cpp-python, 2 threads)
runs the same GGUF converted to the closest type (Q4_0 / Q8_0 / F16) in its own venv
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
CONFIGS = {  # ours: compile flags; llama.cpp: the GGUF type at the closest bits per weight
    "int4": {"flags": ["--method", "rtn", "--bits", "4", "--group", "32"], "llamacpp": "Q4_0"},
    "int8": {"flags": ["--method", "rtn", "--bits", "8", "--group", "32"], "llamacpp": "Q8_0"},
    "fp": {"flags": ["--dtype", "float16"], "llamacpp": "F16"},
}


def compile_artifact(out: Path, flags: list[str]) -> float:
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "bitsmith.compiler.cli", "compile", "-o", str(out), *flags],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.time() - t0


def decode_rate(path: Path, tokens: int, runs: int = 3) -> tuple[float, int]:
    """Median tokens/s of `tokens` greedy decode steps after a prefill; also the weight bytes a step reads."""
    import numpy as np

    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.executor import CompiledSession

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
    weight_bytes = sum(artifact.weights[n].nbytes for n in used)
    # the embedding lookup reads one row, not the table (unless the table is also the lm_head)
    embed = next(ref for c in step.calls if c.kernel.startswith("embedding") for kind, ref, *_ in c.args if kind == "weight")
    lm_head_reads_table = sum(1 for c in step.calls for kind, ref, *_ in c.args if kind == "weight" and ref == embed) > 1
    if not lm_head_reads_table:
        weight_bytes -= artifact.weights[embed].nbytes
    kv_bytes = len(session.runner.pools) * session.runner.pools[0][0].nbytes / session.runner.block_size * (len(prompt) + tokens // 2)
    return statistics.median(rates), weight_bytes + kv_bytes


def llamacpp_rate(venv: Path, gguf: Path, kind: str, tokens: int, work: Path) -> dict:
    python = venv / "bin" / "python"
    if not python.exists():
        return {"error": f"llama.cpp venv {venv} missing: run bench/peers/setup_llamacpp.sh {venv}"}
    cmd = [str(python), str(HERE / "peers" / "llamacpp_decode.py"), "--gguf", str(gguf), "--type", kind,
           "--tokens", str(tokens), "--prompt", PROMPT, "--workdir", str(work)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        return {"error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--llamacpp-venv", type=Path, default=Path.home() / ".cache" / "bitsmith" / "llamacpp-venv")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--out", type=Path, default=HERE / "decode.md")
    args = parser.parse_args()
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
    from kernels import read_bandwidth

    from bitsmith.compiler.default_model import default_model_path

    gguf = default_model_path()
    bandwidth = read_bandwidth()
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            cfg = CONFIGS[key]
            out = Path(tmp) / key
            compile_s = compile_artifact(out, cfg["flags"])
            ours, bytes_per_token = decode_rate(out, args.tokens)
            peer = llamacpp_rate(args.llamacpp_venv, gguf, cfg["llamacpp"], args.tokens, Path(tmp))
            report[key] = {"ours_tok_s": round(ours, 1), "llamacpp_tok_s": peer.get("tok_s"),
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
