"""Decode tokens/s at batch 1: bitsmith's compiled kernels vs llama.cpp, next to the bandwidth limit.

    python bench/decode.py [--json] [--tokens 64] [--rounds 5] [--configs int4,int8] [--model HF_DIR]
                           [--smoke] [--out FILE]

For int4, int8 and 16-bit weights: compile the model (default: SmolLM2-135M-Instruct Q4_1 GGUF) with
`bitsmith compile` (RTN, every linear at the stated bits; the tied embedding/lm_head stays fp16), prefill
a short prompt, then time greedy decode steps. llama.cpp (llama-cpp-python, 2 threads) runs the same
model in the closest type (Q4_0 / Q8_0 / F16; its tied output matrix stays Q8_0) in its own venv
(bench/peers/setup_llamacpp.sh): for SmolLM2 the GGUF re-quantized with llama_model_quantize, for an HF
directory (--model) the checkpoint converted by llama.cpp's convert_hf_to_gguf.py, then quantized.

Repetitions are INTERLEAVED (ABAB...): both sides stay loaded (ours in this process, llama.cpp in a
`llamacpp_decode.py serve` process per OMP_WAIT_POLICY, passive and unset), each round runs one timed
decode run of ours, then one of each llama.cpp process; each side's figure is the median of its rounds
(llama.cpp's: the faster policy's median). On a shared host that drifts 2x within minutes this keeps a
slow spell from landing on one side only. The limit is bytes read per token (weights the step reads +
the KV cache at the mean position) over the streaming read bandwidth measured at the start of the run
(bench/hostinfo.py); the host line (CPU, flags, that bandwidth) heads the table and is in --json.

--smoke: TinyStories-656K from $BITSMITH_DATA, int4 only, 8 tokens, one round, no file written: checks
that every path runs (tests/bench/test_bench_smoke.py). Without --smoke, writes bench/decode.md.

--rotation: the online rotation's cost instead (no peer): int4 g32 RTN compiled twice, `--rotate none` and
`--rotate hadamard` (--requantize, so a GGUF source is dequantized the same way for both), both loaded, their
decode runs interleaved (A B A B ...); medians, their ratio, and the decode step's kernels that the rotation
changes timed alone (silu*up and RoPE unrotated, their fused Hadamard versions rotated: microseconds per
token). With --activations float32 and int8 (auto). Replaces the "## Online rotation cost" section of
bench/decode.md (or --out), the rest of the file kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo,
# peers) are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line, llamacpp_build, llamacpp_line  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
PROMPT = "Once upon a time, in a small village by the sea, there lived"
CONFIGS = {  # ours: compile flags (int8 activations, as llama.cpp's q8 activations); llama.cpp: the closest type
    "int4": {"flags": ["--method", "rtn", "--bits", "4", "--group", "32", "--activations", "auto"], "llamacpp": "q4_0"},
    "int4_exact": {"flags": ["--method", "rtn", "--bits", "4", "--group", "32", "--activations", "float32"],
                   "llamacpp": "q4_0"},
    "int8": {"flags": ["--method", "rtn", "--bits", "8", "--group", "32", "--activations", "auto"], "llamacpp": "q8_0"},
    "fp": {"flags": ["--dtype", "float16"], "llamacpp": "f16"},
}
COMMON = ["--no-keep-default", "--context", "512", "--concurrency", "1"]  # every linear at the stated bits
POLICIES = ("passive", "default")  # llama.cpp's OMP_WAIT_POLICY, the first is the reference for timeouts
ABANDON_FACTOR = 4  # a later policy's run taking this many times the first's is dropped


def compile_artifact(model: Path | None, out: Path, flags: list[str]) -> float:
    t0 = time.time()
    cmd = [sys.executable, "-m", "bitsmith.cli", "compile", *([str(model)] if model else []), "-o", str(out),
           *flags, *(COMMON if "--method" in flags else COMMON[1:]), "--gate", "none"]
    proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode:  # say why: a bare CalledProcessError hides the compiler's own message
        sys.exit(f"compile failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return time.time() - t0


class Ours:
    """A compiled artifact loaded once; run() is one timed decode run (tokens/s)."""

    def __init__(self, path: Path, tokens: int):
        from bitsmith.runtime.artifact import load_artifact
        from bitsmith.runtime.session import CompiledSession

        self.artifact = load_artifact(path)
        self.prompt = self.artifact.tokenizer().encode(PROMPT)
        self.tokens = tokens
        self.session = CompiledSession(self.artifact, len(self.prompt) + tokens + 1)

    def run(self) -> float:
        import numpy as np

        self.session.reset()
        logits = self.session.prefill(self.prompt)[-1]
        t0 = time.perf_counter()
        for _ in range(self.tokens):
            logits = self.session.decode(int(np.argmax(logits)))
        return self.tokens / (time.perf_counter() - t0)

    def bytes_per_token(self) -> float:
        """Weight bytes a decode step reads + the KV cache at the mean position."""
        from bitsmith.runtime.interleave import X16

        artifact, session = self.artifact, self.session
        step = session.runner.steps[0].schedule
        used = {ref for c in step.calls for kind, ref, *_ in c.args if kind == "weight"}
        # a copy made at load (an interleaved "<name>@x16...") has the bytes of the artifact weight it comes from
        weight_bytes = sum(artifact.weights[n.split(X16)[0]].nbytes for n in used)
        # the embedding lookup reads one row, not the table (unless the table is also the lm_head)
        embed = next(ref for c in step.calls if c.kernel.startswith("embedding")
                     for kind, ref, *_ in c.args if kind == "weight")
        lm_head_reads_table = sum(1 for c in step.calls for kind, ref, *_ in c.args
                                  if kind == "weight" and ref == embed) > 1
        if not lm_head_reads_table:
            weight_bytes -= artifact.weights[embed.split(X16)[0]].nbytes
        pools = session.runner.pools
        kv_bytes = len(pools) * pools[0][0].nbytes / session.runner.block_size * (len(self.prompt) + self.tokens // 2)
        return weight_bytes + kv_bytes


ROTATION_FLAGS = ["--method", "rtn", "--bits", "4", "--group", "32", "--requantize"]
ROTATION_HEADING = "## Online rotation cost"
ROTATED_KERNELS = ("silu_mul", "rope_", "hadamard")  # kernel name prefixes/parts the rotation adds or fuses into


def changed_kernels_us(ours: Ours, repeats: int = 200) -> tuple[float, int]:
    """(microseconds per decode step, calls) of the step's silu*up / RoPE / Hadamard kernels, each called alone
    `repeats` times on the step's own buffers (they only read activations: calling them again changes nothing)."""
    step = ours.session.runner.steps[0]
    picked = [(func, args) for call, (func, args) in zip(step.schedule.calls, step.calls)
              if any(part in call.kernel for part in ROTATED_KERNELS)]
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(repeats):
            for func, args in picked:
                func(*args)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return best * 1e6, len(picked)


def rotation_cost(model: Path | None, tokens: int, rounds: int, activations: str, work: Path) -> dict[str, Any]:
    """int4 g32 RTN unrotated vs --rotate hadamard: interleaved decode rounds, medians, ratio, changed kernels."""
    sessions, compile_s = {}, {}
    for rotate in ("none", "hadamard"):
        out = work / f"int4-{activations}-{rotate}"
        compile_s[rotate] = compile_artifact(model, out, ROTATION_FLAGS + ["--activations", activations,
                                                                           "--rotate", rotate])
        sessions[rotate] = Ours(out, tokens)
    for ours in sessions.values():
        ours.run()  # warm
    runs: dict[str, list[float]] = {rotate: [] for rotate in sessions}
    for _ in range(rounds):
        for rotate, ours in sessions.items():
            runs[rotate].append(ours.run())
    kernels = {rotate: changed_kernels_us(ours) for rotate, ours in sessions.items()}
    plain, rotated = median(runs["none"]), median(runs["hadamard"])
    return {"activations": activations, "none_tok_s": round(plain, 1), "hadamard_tok_s": round(rotated, 1),
            "ratio": round(rotated / plain, 3),
            # each round's rotated / unrotated (run back to back): drift between rounds cancels
            "paired_ratio": round(median([h / n for n, h in zip(runs["none"], runs["hadamard"])]), 3),
            "none_rounds": [round(v, 1) for v in runs["none"]],
            "hadamard_rounds": [round(v, 1) for v in runs["hadamard"]],
            "none_kernels_us": round(kernels["none"][0], 1), "none_kernel_calls": kernels["none"][1],
            "hadamard_kernels_us": round(kernels["hadamard"][0], 1), "hadamard_kernel_calls": kernels["hadamard"][1],
            "compile_s": {k: round(v, 1) for k, v in compile_s.items()}}


def rotation_section(name: str, args: argparse.Namespace, host: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [ROTATION_HEADING, "",
             f"`python bench/decode.py --rotation --tokens {args.tokens} --rounds {args.rounds} --activations "
             f"{args.activations}{'' if args.model is None else ' --model ' + str(args.model)}` "
             f"({name}; int4 g32 RTN, every linear, `--requantize`; {args.tokens} greedy tokens, {args.rounds} rounds "
             "of one unrotated and one rotated run, both loaded; medians). The rotated artifact adds an online "
             "Hadamard before each down_proj (fused into the silu*up kernel) and on q and k after RoPE (fused into "
             "the RoPE kernel); the last columns time those kernels of one decode step alone.", "",
             f"- {host_line(host)}", "",
             "| activations | unrotated tok/s | rotated tok/s | rotated / unrotated | median of per-round ratios | "
             "silu*up + RoPE us/token (calls) | fused Hadamard versions us/token (calls) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['activations']} | {r['none_tok_s']} | {r['hadamard_tok_s']} | {r['ratio']:.3f} | "
                     f"{r['paired_ratio']:.3f} | "
                     f"{r['none_kernels_us']} ({r['none_kernel_calls']}) | "
                     f"{r['hadamard_kernels_us']} ({r['hadamard_kernel_calls']}) |")
    return "\n".join(lines) + "\n"


def replace_section(path: Path, heading: str, section: str) -> None:
    """`path` with the section under `heading` (up to the next "## " heading) replaced, or appended."""
    text = path.read_text() if path.exists() else ""
    start = text.find(heading + "\n")
    if start < 0:
        path.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else text[end + 1:]
    path.write_text(text[:start] + section + ("\n" + rest if rest else ""))


def main_rotation(args: argparse.Namespace) -> None:
    host = host_info(gib=1.0, rounds=5)
    print(host_line(host), file=sys.stderr, flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for activations in args.activations.split(","):
            rows.append(rotation_cost(args.model, args.tokens, args.rounds, activations, Path(tmp)))
            print(f"[{activations}] {rows[-1]}", file=sys.stderr, flush=True)
    name = args.model.name if args.model else "SmolLM2-135M-Instruct"
    section = rotation_section(name, args, host, rows)
    replace_section(args.out or HERE / "decode.md", ROTATION_HEADING, section)
    print(section)
    if args.json:
        print(json.dumps({"host": host, "tokens": args.tokens, "rounds": args.rounds, "model": name, "rotation": rows}))


def peer_gguf(kind: str, model: Path | None, work: Path) -> Path:
    """The GGUF llama.cpp runs for `kind`: SmolLM2's Q4_1 file re-quantized (the default model), or an HF
    directory converted by convert_hf_to_gguf.py to f32 and then quantized. Raises PeerUnavailable."""
    from peers.llamacpp_decode import PeerUnavailable, convert, smollm2_variant, venv_python

    if model is None:
        path = smollm2_variant(kind)
        if not path.exists():
            convert(smollm2_variant("q4_1"), path, kind)
        return path
    if not (model / "config.json").exists():
        raise PeerUnavailable(f"the llama.cpp peer converts HF directories only, not {model}")
    f32 = work / f"{model.name}.f32.gguf"
    if not f32.exists():
        model = converter_input(model, work)
        converter = llamacpp_build().get("convert")
        if not converter or not Path(converter).exists():
            raise PeerUnavailable("no convert_hf_to_gguf.py recorded in llamacpp.env (rerun setup_llamacpp.sh)")
        proc = subprocess.run([str(venv_python()), converter, str(model), "--outfile", str(f32), "--outtype", "f32"],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise PeerUnavailable(f"convert_hf_to_gguf.py {model.name}: {proc.stderr.strip()[-400:]}")
    out = work / f"{model.name}.{kind}.gguf"
    if not out.exists():
        convert(f32, out, kind)
    return out


def converter_input(model: Path, work: Path) -> Path:
    """`model`, or a staged copy the converter can read: a tied checkpoint that stores only lm_head.weight
    (TinyStories-656K does; transformers maps it onto the embedding) gets model.embed_tokens.weight too,
    since convert_hf_to_gguf.py writes no token_embd tensor without it and llama.cpp then cannot load."""
    import json as _json

    from safetensors.numpy import load_file, save_file

    files = sorted(model.glob("*.safetensors"))
    config = _json.loads((model / "config.json").read_text())
    if len(files) != 1 or not config.get("tie_word_embeddings"):
        return model
    tensors = load_file(files[0])
    if "model.embed_tokens.weight" in tensors or "lm_head.weight" not in tensors:
        return model
    staged = work / f"{model.name}.staged"
    staged.mkdir(exist_ok=True)
    for item in model.iterdir():
        if item.suffix != ".safetensors" and not (staged / item.name).exists():
            (staged / item.name).symlink_to(item.resolve())
    tensors["model.embed_tokens.weight"] = tensors.pop("lm_head.weight")
    save_file(tensors, str(staged / files[0].name), metadata={"format": "pt"})
    return staged


def measure(ours: Ours, gguf: Path | None, tokens: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds: {"ours": [tok/s per round], "llamacpp": {policy: [tok/s per round]}, "error"}."""
    from peers.llamacpp_decode import DecodeServer, PeerUnavailable

    servers: dict[str, Any] = {}
    error = None
    if gguf is not None:
        try:
            for policy in POLICIES:
                servers[policy] = DecodeServer(gguf, tokens=tokens, prompt=PROMPT, omp_wait_policy=policy)
            for server in servers.values():
                server.ready()
        except (PeerUnavailable, OSError, subprocess.SubprocessError) as exc:
            error = str(exc)
            for server in servers.values():
                server.close(kill=True)
            servers = {}
    first_s: list[float] = []  # the first policy's latest run, seconds

    def peer_run(policy: str) -> float:
        server = servers[policy]
        if not server.alive():
            return math.nan
        first = policy == POLICIES[0]
        timeout = 600.0 if first else max(30.0, ABANDON_FACTOR * first_s[-1])
        try:
            tok_s = server.run(timeout)["decode_tok_s"]
        except (PeerUnavailable, subprocess.TimeoutExpired) as exc:
            if first:  # no reference run: the peer is out of this config, ours goes on alone
                out["error"] = f"llama.cpp stopped answering: {exc}"
                for other in servers.values():
                    other.close(kill=True)
            return math.nan
        if first:
            first_s.append(tokens / tok_s)
        return tok_s

    out: dict[str, Any] = {"ours": [], "llamacpp": {p: [] for p in servers}, "error": error}
    ours.run()  # warm: caches, page tables, thread pools
    for policy in servers:
        peer_run(policy)
    for _ in range(rounds):
        out["ours"].append(ours.run())
        for policy in servers:
            out["llamacpp"][policy].append(peer_run(policy))
    for server in servers.values():
        server.close()
    return out


def median(values: list[float]) -> float | None:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (ours, llama.cpp, ...)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--model", type=Path, default=None, help="an HF directory (default: SmolLM2-135M GGUF)")
    parser.add_argument("--smoke", action="store_true", help="TinyStories-656K, int4, 8 tokens, 1 round, no file")
    parser.add_argument("--out", type=Path, default=None, help="markdown file to write (default bench/decode.md)")
    parser.add_argument("--rotation", action="store_true", help="the online rotation's cost: int4 unrotated vs "
                        "--rotate hadamard, interleaved (no peer)")
    parser.add_argument("--activations", default="float32,auto", help="--rotation: the activation modes to run")
    args = parser.parse_args()
    if args.rotation:
        os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))
        return main_rotation(args)
    if args.smoke:
        args.model = args.model or DATA / "tinystories-656k"
        args.tokens, args.rounds, args.configs = 8, 1, "int4"
        if not args.model.is_dir():
            sys.exit(f"--smoke needs {args.model} (set BITSMITH_DATA)")
    out_md = args.out or (None if args.smoke else HERE / "decode.md")
    os.environ.setdefault("TVM_NUM_THREADS", str(len(os.sched_getaffinity(0))))

    host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
    bandwidth = host["read_bandwidth_gbs"]
    build = llamacpp_build()
    print(host_line(host), file=sys.stderr, flush=True)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in args.configs.split(","):
            cfg = CONFIGS[key]
            out = Path(tmp) / key
            compile_s = compile_artifact(args.model, out, cfg["flags"])
            ours = Ours(out, args.tokens)
            gguf, error = None, None
            if build["runs_here"]:
                from peers.llamacpp_decode import PeerUnavailable

                try:
                    gguf = peer_gguf(cfg["llamacpp"], args.model, Path(tmp))
                except (PeerUnavailable, OSError, subprocess.SubprocessError) as exc:
                    error = str(exc)
            else:
                error = build["why"]
            runs = measure(ours, gguf, args.tokens, args.rounds)
            error = error or runs["error"]
            by_policy = {p: median(v) for p, v in runs["llamacpp"].items()}
            by_policy = {p: v for p, v in by_policy.items() if v is not None}
            peer = max(by_policy.values()) if by_policy else None
            bytes_per_token = ours.bytes_per_token()
            ours_tok_s = median(runs["ours"])
            report[key] = {"ours_tok_s": round(ours_tok_s, 1), "llamacpp_tok_s": round(peer, 1) if peer else None,
                           "ratio": round(ours_tok_s / peer, 2) if peer else None,
                           "ours_rounds": [round(v, 1) for v in runs["ours"]],
                           "llamacpp_rounds": {p: [None if math.isnan(v) else round(v, 1) for v in vs]  # NaN: dropped
                                               for p, vs in runs["llamacpp"].items()},
                           "llamacpp_policy": max(by_policy, key=by_policy.get) if by_policy else None,
                           "ours_flags": " ".join(cfg["flags"]), "llamacpp_type": cfg["llamacpp"],
                           "llamacpp_gguf": str(gguf) if gguf else None, "llamacpp_error": error,
                           "limit_tok_s": round(bandwidth * 1e9 / bytes_per_token, 1) if bandwidth else None,
                           "bytes_per_token": bytes_per_token, "compile_s": round(compile_s, 1)}
            del ours
            print(f"[{key}] {report[key]}", file=sys.stderr, flush=True)
    name = args.model.name if args.model else "SmolLM2-135M-Instruct"
    lines = [f"# Decode speed: {name}, batch 1", "",
             f"`python bench/decode.py{' --smoke' if args.smoke else ''}` ({args.tokens} greedy tokens after a "
             f"{len(PROMPT.split())}-word prompt; {args.rounds} rounds, ours and llama.cpp interleaved in each, "
             "medians of each side; llama.cpp: the faster OMP_WAIT_POLICY of passive and unset).", "",
             f"- {host_line(host)}", f"- {llamacpp_line(build)}", "",
             "| weights | ours tok/s | llama.cpp tok/s (type) | limit tok/s | MB read per token | ours / llama.cpp |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, r in report.items():
        peer = f"{r['llamacpp_tok_s']} ({r['llamacpp_type']})" if r["llamacpp_tok_s"] else f"n/a: {r['llamacpp_error']}"
        ratio = f"{r['ratio']:.2f}" if r["ratio"] else "-"
        lines.append(f"| {key} | {r['ours_tok_s']} | {peer} | {r['limit_tok_s']} | "
                     f"{r['bytes_per_token'] / 1e6:.1f} | {ratio} |")
    if out_md:
        out_md.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if args.json:
        print(json.dumps({"host": host, "llamacpp_build": build, "tokens": args.tokens, "rounds": args.rounds,
                          "model": name, "configs": report}))


if __name__ == "__main__":
    main()
