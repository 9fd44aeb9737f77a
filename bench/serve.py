"""Serving throughput over HTTP: `bitsmith serve` vs llama.cpp's server at concurrency 1, 4 and 16.

    python bench/serve.py [--json] [--artifact DIR] [--llamacpp-venv DIR]

Both servers get the same OpenAI `/v1/completions` streaming requests (request i's prompt is
"Request i. " + one text, so no prompt cache can skip a prefill; greedy, a fixed number of output
tokens, `ignore_eos` where supported) from a closed-loop client: `c` requests in flight until 2c (at
least 4) finish. Reported: median time to first token, median inter-token
latency and output tokens/s. Our artifact: SmolLM2-135M int4 (compiled here unless --artifact);
llama.cpp: `llama-cpp-python[server]` on the same GGUF converted to Q4_0 (bench/peers/setup_llamacpp.sh).
Ours is compiled like llama.cpp's Q4_0 file: 4-bit linears (ours g32 RTN; the first and last layer
16-bit, as our default policy keeps them) and an 8-bit lm_head (`--scheme lm_head=int8`; Q4_0 files
store the tied output as Q8_0), int8 activations for the 4/8-bit GEMVs as llama.cpp does, and an int8 KV
cache (`--kv-dtype int8`; llama.cpp's server keeps its default f16 cache).
Both servers run at once and the load levels alternate between them (ours at c=1, llama.cpp at c=1,
ours at c=4, ...), so the shared host's drift over the run hits both alike. The table is headed by the
host line (bench/hostinfo.py: CPU, flags, streaming read bandwidth; --json has it under "host").
Prints the table (and with --out writes it to a file); bench/serve.md quotes a run.

--smoke: TinyStories-656K from $BITSMITH_DATA (compiled like the int4 artifact), 4 output tokens,
concurrency 1 and 2 (tests/bench/test_bench_smoke.py); llama.cpp only if its server is installed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo)
# are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line  # noqa: E402
from loadgen import closed_loop  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
PROMPT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps and listening to the sea. "
          "Ships passed far away, and the light turned slowly over the water. One night he saw")
LEVELS = (1, 4, 16)
SMOLLM2_Q4_0 = Path.home() / ".cache" / "bitsmith" / "llamacpp-models" / "SmolLM2-135M-Instruct.from-Q4_1.Q4_0.gguf"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, path: str, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"server on port {port} did not come up")


def one_request(port: int, model: str, tokens: int, index: int) -> tuple[float, list[float]]:
    """(time to first token, arrival times of content chunks) for one streaming completion."""
    body = {"model": model, "prompt": f"Request {index}. {PROMPT}", "max_tokens": tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    times = []
    buffer = b""
    while True:
        chunk = resp.read1(65536) if hasattr(resp, "read1") else resp.read(1)
        if not chunk:
            break
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            if event.startswith(b"data: ") and event[6:].strip() != b"[DONE]":
                data = json.loads(event[6:])
                if data.get("choices") and data["choices"][0].get("text"):
                    times.append(time.perf_counter())
    conn.close()
    return (times[0] - t0 if times else float("nan")), times


def load(port: int, model: str, concurrency: int, tokens: int) -> dict:
    total = max(4, 2 * concurrency)
    done, failed, wall = closed_loop(concurrency, total, lambda index: one_request(port, model, tokens, index),
                                     (OSError, http.client.HTTPException))  # counted and reported, not a crash
    chunks = sum(len(t) for _, t in done)
    itl = [b - a for _, t in done for a, b in zip(t, t[1:])]
    return {"concurrency": concurrency, "requests": total, "failed": len(failed), "errors": sorted(set(failed))[:3],
            "ttft_ms": 1e3 * statistics.median(f for f, _ in done) if done else float("nan"),
            "itl_ms": 1e3 * statistics.median(itl) if itl else None, "tok_s": chunks / wall}


def serve_ours(artifact: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "bitsmith.cli", "serve", str(artifact), "--port", str(port),
                             "--model-name", "bitsmith"], stderr=subprocess.DEVNULL)
    wait_ready(port, "/health")
    return proc, port


def serve_llamacpp(venv: Path, gguf: Path) -> tuple[subprocess.Popen, int] | str:
    python = venv / "bin" / "python"
    if not python.exists():
        return f"llama.cpp venv {venv} missing"
    check = subprocess.run([str(python), "-c", "import llama_cpp.server"], capture_output=True, text=True)
    if check.returncode:
        return "llama-cpp-python[server] is not installed: " + (check.stderr.strip().splitlines() or ["?"])[-1]
    port = free_port()
    proc = subprocess.Popen([str(python), "-m", "llama_cpp.server", "--model", str(gguf), "--port", str(port),
                             "--n_threads", str(len(os.sched_getaffinity(0))), "--n_ctx", "4096",
                             # its default cancels the running stream when a new request arrives; queue instead
                             "--interrupt_requests", "False"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, "/v1/models")
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--artifact", type=Path, default=None)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--llamacpp-venv", type=Path, default=Path.home() / ".cache" / "bitsmith" / "llamacpp-venv")
    parser.add_argument("--llamacpp-gguf", type=Path, default=None,
                        help="default: SmolLM2's Q4_0 conversion (none with --smoke: ours serves TinyStories)")
    parser.add_argument("--out", type=Path, default=None, help="also write the table to this file")
    parser.add_argument("--smoke", action="store_true", help="TinyStories-656K, 4 tokens, concurrency 1 and 2")
    args = parser.parse_args()
    levels, model, concurrency = LEVELS, [], "16"
    if args.smoke:
        levels, args.tokens, concurrency = (1, 2), 4, "4"
        model = [str(DATA / "tinystories-656k")]
        if not Path(model[0]).is_dir():
            sys.exit(f"--smoke needs {model[0]} (set BITSMITH_DATA)")
    host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
    report: dict = {"host": host, "ours": [], "llamacpp": []}
    procs = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            artifact = args.artifact
            if artifact is None:
                artifact = Path(tmp) / "int4"
                subprocess.run([sys.executable, "-m", "bitsmith.cli", "compile", *model, "-o", str(artifact), "--method",
                                "rtn", "--bits", "4", "--group", "32", "--concurrency", concurrency, "--context", "512",
                                "--activations", "auto", "--scheme", "lm_head=int8", "--kv-dtype", "int8",
                                "--gate", "none"],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            proc, port = serve_ours(artifact)
            procs.append(proc)
            gguf = args.llamacpp_gguf or (None if args.smoke else SMOLLM2_Q4_0)
            if gguf is None:
                peer = "--smoke serves TinyStories: no GGUF of it given (--llamacpp-gguf)"
            elif not gguf.exists():
                peer = f"{gguf} missing (bench/peers/llamacpp_decode.py converts it)"
            else:
                peer = serve_llamacpp(args.llamacpp_venv, gguf)
            if isinstance(peer, str):
                report["llamacpp_error"] = peer
            else:
                procs.append(peer[0])
            for c in levels:  # alternate the servers level by level
                report["ours"].append(load(port, "bitsmith", c, args.tokens))
                if not isinstance(peer, str):
                    report["llamacpp"].append(load(peer[1], "x", c, args.tokens))
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait(30)
    lines = [f"# Serving over HTTP: {'TinyStories-656K' if args.smoke else 'SmolLM2-135M'} int4", "",
             f"`python bench/serve.py --json` on this 2-core CPU: streaming /v1/completions, greedy, {args.tokens} output "
             "tokens, closed loop (2c requests, at least 4); the servers alternate level by level.", "",
             f"- {host_line(host)}", "",
             "| server | concurrency | failed | TTFT ms p50 | ITL ms p50 | output tok/s |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("ours", "llamacpp"):
        for r in report[name]:
            itl = f"{r['itl_ms']:.1f}" if r["itl_ms"] else "-"
            lines.append(f"| {name} | {r['concurrency']} | {r['failed']} | {r['ttft_ms']:.0f} | {itl} | {r['tok_s']:.1f} |")
    if report.get("llamacpp_error"):
        lines.append(f"\nllama.cpp server not measured: {report['llamacpp_error']}")
    ours = {r["concurrency"]: r["tok_s"] for r in report["ours"]}
    if 1 in ours and 16 in ours:
        lines.append(f"\nours: throughput at concurrency 16 / concurrency 1 = {ours[16] / ours[1]:.2f}x")
    if args.out is not None:
        args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        print(json.dumps(report))


if __name__ == "__main__":
    main()
