"""lm-evaluation-harness scores a local multiple-choice task against `bitsmith serve` and against transformers (fp32).

    python bench/lmeval.py [--artifact DIR] [--limit N] [--text-requests] [--json] [--out FILE]

The task is bench/lmeval_task (80 four-choice questions of our own writing, no hub download). The harness
(lm_eval from PyPI, in its own venv: bench/peers/setup_lmeval.sh; $BITSMITH_LMEVAL_VENV overrides the path)
runs it twice on the same weights:
  ours:  `--model local-completions` against `bitsmith serve ARTIFACT` (echo + logprobs on /v1/completions;
         token-id prompts unless --text-requests), the artifact compiled here by the default
         `bitsmith compile` (SmolLM2-135M-Instruct keeping its Q4_1 codes exactly) unless --artifact;
  ref:   `--model hf` on the same GGUF dequantized by transformers (gguf_file=, float32).
Printed: acc / acc_norm with stderr for both, their difference in units of the combined stderr, the
per-question agreement of the chosen answers, the largest log-likelihood difference, wall times and the
host (bench/hostinfo.py). bench/lmeval.md quotes a run.

--smoke: TinyStories-656K from $BITSMITH_DATA compiled without quantization, 6 questions; the reference is
transformers on its HF directory. --json prints everything, per-question log-likelihoods included
(tests/bench/test_lmeval.py reads them).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import http.client
import json
import math
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
# bench/ goes to the END of sys.path, as in bench/serve.py: hostinfo is found, bench/kernels.py shadows nothing
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", REPO.parent / "shared" / "data"))
TASK_DIR = HERE / "lmeval_task"
TASK = "bitsmith_mc"
LMEVAL_VENV = Path(os.environ.get("BITSMITH_LMEVAL_VENV", Path.home() / ".cache" / "bitsmith" / "lmeval-venv"))
SMOLLM2_GGUF = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TOKENIZER = DATA / "smollm2-135m-instruct-q4_1"  # tokenizer.json = the GGUF's vocabulary, checked equal
MODEL_NAME = "bitsmith"
# the harness must not reach a hub: the task is a local JSON file and every model a local path
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lmeval_bin() -> Path:
    exe = LMEVAL_VENV / "bin" / "lm_eval"
    if not exe.exists():
        raise SystemExit(f"lm_eval is not installed in {LMEVAL_VENV}: run bench/peers/setup_lmeval.sh "
                         "(or point BITSMITH_LMEVAL_VENV at a venv that has it)")
    return exe


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def compile_artifact(out: Path, model: Path | None, extra: tuple[str, ...] | list[str] = ()) -> float:
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "bitsmith.cli", "compile", *([str(model)] if model else []), "-o", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


@contextlib.contextmanager
def serve(artifact: Path, log: Path) -> Iterator[int]:
    """`bitsmith serve ARTIFACT` on a free port until the block ends; yields the port."""
    port = free_port()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "bitsmith.cli", "serve", str(artifact), "--port", str(port),
                                 "--model-name", MODEL_NAME], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"bitsmith serve exited {proc.returncode}:\n{log.read_text()[-3000:]}")
                try:
                    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                    conn.request("GET", "/health")
                    if conn.getresponse().status == 200:
                        break
                except OSError:
                    pass
                if time.time() > deadline:
                    raise SystemExit(f"bitsmith serve on port {port} did not come up:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
            yield port
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_harness(model: str, model_args: str, out: Path, limit: int | None, extra: list[str]) -> dict:
    """One lm_eval run of the task; returns {results, samples, seconds}."""
    cmd = [str(lmeval_bin()), "--model", model, "--model_args", model_args, "--tasks", TASK,
           "--include_path", str(TASK_DIR), "--output_path", str(out), "--log_samples", *extra,
           *(["--limit", str(limit)] if limit else [])]
    t0 = time.perf_counter()
    # from the task folder: the YAML's data_files path is relative to the working directory
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=TASK_DIR, env={**os.environ, **OFFLINE})
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval --model {model} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    results = json.loads(Path(sorted(glob.glob(str(out / "*" / "results_*.json")))[-1]).read_text())
    samples = [json.loads(line) for line in
               Path(sorted(glob.glob(str(out / "*" / f"samples_{TASK}_*.jsonl")))[-1]).read_text().splitlines()]
    return {"results": results["results"][TASK], "samples": samples, "seconds": seconds}


def per_question(samples: list[dict]) -> dict[int, dict]:
    """doc_id -> {logliks per choice, target, acc, acc_norm, chosen (argmax loglik), chosen_norm}."""
    rows = {}
    for s in samples:
        ll = [float(r[0]) for r in s["filtered_resps"]]
        # acc_norm divides by the choice's length in bytes (lm_eval's definition), so recompute its choice too
        lengths = [len((" " + c).encode()) for c in s["doc"]["choices"]]
        rows[int(s["doc_id"])] = {"logliks": ll, "target": int(s["target"]), "acc": float(s["acc"]),
                                  "acc_norm": float(s["acc_norm"]),
                                  "chosen": max(range(len(ll)), key=ll.__getitem__),
                                  "chosen_norm": max(range(len(ll)), key=lambda i: ll[i] / lengths[i])}
    return rows


def summarize(ours: dict, ref: dict) -> dict:
    a, b = per_question(ours["samples"]), per_question(ref["samples"])
    if a.keys() != b.keys():
        raise SystemExit(f"the two runs scored different questions: {sorted(a.keys() ^ b.keys())}")
    out = {"questions": len(a)}
    for metric in ("acc", "acc_norm"):
        va, vb = ours["results"][f"{metric},none"], ref["results"][f"{metric},none"]
        sa, sb = ours["results"][f"{metric}_stderr,none"], ref["results"][f"{metric}_stderr,none"]
        combined = math.hypot(sa, sb)
        out[metric] = {"ours": va, "ours_stderr": sa, "ref": vb, "ref_stderr": sb,
                       "diff_in_stderr": (va - vb) / combined if combined else 0.0}
    out["same_choice"] = sum(a[i]["chosen"] == b[i]["chosen"] for i in a)
    out["same_choice_norm"] = sum(a[i]["chosen_norm"] == b[i]["chosen_norm"] for i in a)
    diffs = [(abs(x - y), abs(x - y) / max(abs(y), 1e-9)) for i in a for x, y in zip(a[i]["logliks"], b[i]["logliks"])]
    out["max_abs_loglik_diff"] = max(d[0] for d in diffs)
    out["max_rel_loglik_diff"] = max(d[1] for d in diffs)
    out["per_question"] = {str(i): {"ours": a[i]["logliks"], "ref": b[i]["logliks"], "target": a[i]["target"]}
                           for i in sorted(a)}
    return out


def table(report: dict) -> str:
    s = report["summary"]
    lines = [host_line(report["host"]), f"load average (1, 5, 15 min) after the runs: {report['loadavg']}",
             f"task {TASK}: {s['questions']} questions x 4 choices; lm_eval {report['lmeval_version']}; "
             f"artifact {report['artifact']}",
             "", "| metric | bitsmith serve (local-completions) | transformers fp32 (hf) | diff / combined stderr |",
             "| --- | --- | --- | --- |"]
    for metric in ("acc", "acc_norm"):
        m = s[metric]
        lines.append(f"| {metric} | {m['ours']:.4f} ± {m['ours_stderr']:.4f} | {m['ref']:.4f} ± {m['ref_stderr']:.4f} "
                     f"| {m['diff_in_stderr']:+.2f} |")
    lines += ["", f"same chosen answer: {s['same_choice']}/{s['questions']} (acc), "
                  f"{s['same_choice_norm']}/{s['questions']} (acc_norm)",
              f"largest log-likelihood difference over {4 * s['questions']} choices: "
              f"{s['max_abs_loglik_diff']:.2e} nats ({s['max_rel_loglik_diff']:.2e} relative)",
              f"wall time: bitsmith serve {report['ours_seconds']:.1f} s (harness run, server warm), "
              f"transformers {report['ref_seconds']:.1f} s (harness run, model load included)"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--artifact", type=Path, help="a compiled artifact (default: compile SmolLM2 here)")
    ap.add_argument("--limit", type=int, help="score only the first N questions")
    ap.add_argument("--text-requests", action="store_true", help="send text prompts (tokenized_requests=False)")
    ap.add_argument("--concurrent", type=int, default=4, help="requests in flight (lm_eval num_concurrent)")
    ap.add_argument("--smoke", action="store_true", help="TinyStories-656K, 6 questions")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path, help="also write the table here")
    args = ap.parse_args()
    lmeval_bin()
    with tempfile.TemporaryDirectory(prefix="bitsmith-lmeval-") as tmp:
        tmp = Path(tmp)
        if args.smoke:
            model_dir = DATA / "tinystories-656k"
            if not (model_dir / "config.json").exists():
                raise SystemExit(f"--smoke needs {model_dir} (set BITSMITH_DATA)")
            # a Llama sentencepiece model trained with BOS: both sides prepend it; a float32 KV cache, so the
            # served log-likelihoods are float32 end to end like transformers'
            limit, tokenizer, bos, extra = args.limit or 6, model_dir, True, ["--kv-dtype", "float32"]
            ref_args = f"pretrained={model_dir},dtype=float32"
        else:
            # SmolLM2's tokenizer adds no BOS by default; said explicitly so both sides agree
            model_dir, limit, tokenizer, bos, extra = None, args.limit, SMOLLM2_TOKENIZER, False, []
            ref_args = f"pretrained={SMOLLM2_GGUF.parent},gguf_file={SMOLLM2_GGUF.name},dtype=float32"
        # lm_eval's hf model prepends the tokenizer's BOS unless told (add_bos_token=None) and local-completions
        # never does (False): the same explicit value on both sides scores the same token ids
        ref_args += f",add_bos_token={bos}"
        artifact = args.artifact or tmp / "artifact"
        compile_s = None if args.artifact else compile_artifact(artifact, model_dir, extra)
        ours_args = (f"model={MODEL_NAME},base_url=http://127.0.0.1:{{port}}/v1/completions,"
                     f"tokenizer_backend=huggingface,tokenizer={tokenizer},"
                     f"tokenized_requests={not args.text_requests},add_bos_token={bos},num_concurrent={args.concurrent},max_retries=1")
        with serve(artifact, tmp / "serve.log") as port:
            ours = run_harness("local-completions", ours_args.format(port=port), tmp / "ours", limit, [])
        ref = run_harness("hf", ref_args, tmp / "ref", limit, ["--device", "cpu", "--batch_size", "16"])
    version = subprocess.run([str(LMEVAL_VENV / "bin" / "python"), "-c", "import lm_eval; print(lm_eval.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    report = {"host": host_info(), "loadavg": " ".join(f"{x:.2f}" for x in os.getloadavg()),
              "lmeval_version": version, "artifact": str(args.artifact or ("tinystories-656k fp32" if args.smoke
                                                                         else "SmolLM2-135M-Instruct Q4_1 (default compile)")),
              "compile_seconds": compile_s, "tokenized_requests": not args.text_requests, "add_bos_token": bos,
              "ours_seconds": ours["seconds"], "ref_seconds": ref["seconds"], "summary": summarize(ours, ref)}
    text = table(report)
    if args.out:
        args.out.write_text(text + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(text)


if __name__ == "__main__":
    main()
