"""llama.cpp decode speed (batch 1, greedy), and GGUF type conversion, through llama-cpp-python.

The commands run inside the llama.cpp peer venv (bench/peers/setup_llamacpp.sh); other code calls the
`decode_tok_s` / `convert` wrappers below from any Python, and they run this file with the venv's
interpreter. Each command prints one JSON line on stdout.

    VENV=~/.cache/bitsmith/llamacpp-venv
    $VENV/bin/python bench/peers/llamacpp_decode.py decode MODEL.gguf [--tokens 64] [--runs 5]
        [--threads 2] [--prompt TEXT] [--flash-attn auto|on|off] [--omp-wait-policy default|passive]
    $VENV/bin/python bench/peers/llamacpp_decode.py serve MODEL.gguf [--tokens 64] [--threads 2] [--prompt TEXT]
        [--flash-attn ...] [--omp-wait-policy ...]   (then one line `run` per measured run on stdin)
    $VENV/bin/python bench/peers/llamacpp_decode.py table [--types q4_1,q4_0,q8_0,f16,f32]   (SmolLM2)
    $VENV/bin/python bench/peers/llamacpp_decode.py quantize IN.gguf OUT.gguf --type q4_0 [--pure]
    $VENV/bin/python bench/peers/llamacpp_decode.py convert-smollm2 [--types q4_0,q8_0,f16,f32]

decode: the prompt is evaluated first (timed separately, `prompt_tok_s`); then `--tokens` single-token
llama_decode calls, each feeding back the greedy argmax of the previous logits, are timed together;
`decode_tok_s` is the median over `--runs` runs (after one warm-up run), the KV cache cleared between
runs; `decode_tok_s_best` the fastest run (the least disturbed on a shared machine). The model file is
loaded once (mmap, llama.cpp's default; Q4_0 weights are repacked to the CPU_REPACK buffer type on
AVX2/AVX-512 as in llama-cli).

serve: the same measurement, one run per `run` line read from stdin (after printing {"ready": ...} with
the model's description once loaded), so a bench can interleave llama.cpp's runs with its own (ABAB...,
bench/decode.py); `DecodeServer` below drives it from any Python.

quantize: llama_model_quantize. Our SmolLM2 GGUF is Q4_1 (token_embd Q8_0), so every output is
re-quantized from Q4_1 values (`allow_requantize`): fine for speed, not for quality. Without --pure,
llama.cpp's usual per-tensor choices apply, as llama-quantize would make them (for SmolLM2's tied
token_embd / output matrix of a Q4_0 file: Q6_K, which needs 256-wide rows, falls back to Q8_0);
--pure makes every matrix the requested type.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_VENV = Path.home() / ".cache" / "bitsmith" / "llamacpp-venv"
SMOLLM2 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTED = Path.home() / ".cache" / "bitsmith" / "llamacpp-models"
N_BATCH = 512  # llama.cpp's default logical and physical batch
PROMPT = "The history of the printing press begins in"

FTYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q4_k_m": 15, "q6_k": 18}


# ---------------------------------------------------------------------------------------------
# wrappers for code outside the venv (bench/decode.py)


class PeerUnavailable(RuntimeError):
    """The llama.cpp peer cannot run here; the message says why."""


def venv_python(venv: Path | None = None) -> Path:
    venv = venv or Path(os.environ.get("BITSMITH_LLAMACPP_VENV", DEFAULT_VENV))
    python = venv / "bin" / "python"
    if not python.exists():
        raise PeerUnavailable(f"no llama.cpp peer venv at {venv} (run bench/peers/setup_llamacpp.sh)")
    return python


def _run_in_venv(args: list[str], venv: Path | None, timeout: float) -> dict[str, Any]:
    proc = subprocess.run([str(venv_python(venv)), str(Path(__file__).resolve()), *args],
                          capture_output=True, text=True, timeout=timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise PeerUnavailable(f"llamacpp_decode.py {args[0]} exited {proc.returncode}: {proc.stderr.strip()[-600:]}")
    return json.loads(lines[-1])


def decode_tok_s(model: str | Path, tokens: int = 64, runs: int = 5, threads: int = 2, prompt: str = PROMPT,
                 flash_attn: str = "auto", omp_wait_policies: tuple[str, ...] = ("passive", "default"),
                 venv: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    """llama.cpp batch-1 decode measurement of a GGUF file (the `decode` command's JSON).

    One process per OMP_WAIT_POLICY in `omp_wait_policies`; the faster one is returned, with
    `decode_tok_s_by_policy` holding all. (llama-cpp-python builds ggml with OpenMP; GOMP's default
    spinning barriers collapse on the shared 2-vCPU VM whenever another process wants a core: 2-20 tok/s
    instead of ~150.) A policy after the first is abandoned (None in `decode_tok_s_by_policy`) when it
    takes 4 times as long as the first.
    """
    results, by_policy, first_wall = [], {}, 0.0
    for policy in omp_wait_policies:
        t0 = time.perf_counter()
        try:
            results.append(_run_in_venv(
                ["decode", str(model), "--tokens", str(tokens), "--runs", str(runs), "--threads", str(threads),
                 "--prompt", prompt, "--flash-attn", flash_attn, "--omp-wait-policy", policy], venv,
                max(60.0, 4 * first_wall) if first_wall else timeout))
        except subprocess.TimeoutExpired:
            if not first_wall:
                raise PeerUnavailable(f"llama.cpp decode {model}: no result in {timeout:.0f} s") from None
            by_policy[policy] = None
            continue
        first_wall = first_wall or time.perf_counter() - t0
        by_policy[policy] = results[-1]["decode_tok_s"]
    best = dict(max(results, key=lambda r: r["decode_tok_s"]))
    best["decode_tok_s_by_policy"] = by_policy
    return best


def convert(src: str | Path, dst: str | Path, kind: str, pure: bool = False, venv: Path | None = None,
            timeout: float = 900) -> dict[str, Any]:
    """Re-quantize a GGUF file with llama_model_quantize (the `quantize` command's JSON)."""
    return _run_in_venv(["quantize", str(src), str(dst), "--type", kind] + (["--pure"] if pure else []),
                        venv, timeout)


class DecodeServer:
    """The `serve` command in the venv, one run at a time: ready() once, then run() -> that run's JSON
    ({"decode_tok_s", "prompt_tok_s", "generated", ...}). A run that does not answer within its timeout
    kills the process and raises subprocess.TimeoutExpired; a process that dies raises PeerUnavailable."""

    def __init__(self, model: str | Path, tokens: int = 64, threads: int = 2, prompt: str = PROMPT,
                 flash_attn: str = "auto", omp_wait_policy: str = "default", venv: Path | None = None):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            from lineproc import LineProcess, PeerExited
        finally:
            sys.path.pop(0)
        self._exited = PeerExited
        self.policy = omp_wait_policy
        cmd = [str(venv_python(venv)), str(Path(__file__).resolve()), "serve", str(model), "--tokens", str(tokens),
               "--threads", str(threads), "--prompt", prompt, "--flash-attn", flash_attn,
               "--omp-wait-policy", omp_wait_policy]
        self.io = LineProcess(cmd, label=f"llama.cpp decode {Path(model).name} (OMP_WAIT_POLICY {omp_wait_policy})")

    def _call(self, command: str | None, timeout: float) -> dict[str, Any]:
        try:
            return self.io.ask(command, timeout) if command else self.io.read(timeout)
        except self._exited as exc:
            raise PeerUnavailable(str(exc)) from None

    def ready(self, timeout: float = 300) -> dict[str, Any]:
        return self._call(None, timeout)

    def run(self, timeout: float = 300) -> dict[str, Any]:
        return self._call("run", timeout)

    def alive(self) -> bool:
        return self.io.alive()

    def close(self, kill: bool = False) -> None:
        self.io.close(kill)


def smollm2_variant(kind: str, pure: bool = False) -> Path:
    """Where convert-smollm2 puts (or finds) SmolLM2 of one llama.cpp type ('q4_1' is the original)."""
    if kind == "q4_1":
        return SMOLLM2
    return CONVERTED / f"SmolLM2-135M-Instruct.from-Q4_1.{kind.upper()}{'.pure' if pure else ''}.gguf"


# ---------------------------------------------------------------------------------------------
# commands (inside the venv)


def _llama(omp_wait_policy: str = "default") -> Any:
    # libgomp reads OMP_WAIT_POLICY once, when libggml-cpu is loaded by `import llama_cpp`
    if omp_wait_policy != "default":
        os.environ["OMP_WAIT_POLICY"] = omp_wait_policy
    import llama_cpp
    from llama_cpp import _logger

    _logger.set_verbose(bool(os.environ.get("LLAMACPP_VERBOSE")))
    llama_cpp.llama_backend_init()
    return llama_cpp


def tensor_types(path: str | Path) -> dict[str, int]:
    """{ggml type name: tensor count} of a GGUF file (gguf-py; empty if it is not importable)."""
    try:
        import collections

        import gguf
    except ImportError:
        return {}
    reader = gguf.GGUFReader(str(path))
    return dict(collections.Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1))


def cmd_quantize(src: str, dst: str, kind: str, pure: bool = False, threads: int = 2) -> dict[str, Any]:
    L = _llama()
    params = L.llama_model_quantize_default_params()
    params.ftype = FTYPES[kind]
    params.nthread = threads
    params.allow_requantize = True
    params.pure = pure
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise SystemExit(f"llama_model_quantize {src} -> {dst} ({kind}) returned {rc}")
    return {"src": str(src), "dst": str(dst), "type": kind, "pure": pure, "seconds": time.perf_counter() - t0,
            "bytes": os.path.getsize(dst), "matrix_types": tensor_types(dst)}


class _Decoder:
    """A loaded model and context: run() is one measured run (KV cache cleared, prompt evaluated, then
    `tokens` single-token llama_decode calls feeding back the greedy argmax)."""

    def __init__(self, model_path: str, tokens: int, threads: int, prompt: str, flash_attn: str = "auto",
                 omp_wait_policy: str = "default"):
        import ctypes

        L = self.L = _llama(omp_wait_policy)
        self.model_path, self.tokens, self.threads, self.flash_attn = model_path, tokens, threads, flash_attn
        self.model = L.llama_model_load_from_file(str(model_path).encode(), L.llama_model_default_params())
        if not self.model:
            raise SystemExit(f"cannot load {model_path}")
        vocab = L.llama_model_get_vocab(self.model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)
        text = prompt.encode()
        buf = (L.llama_token * (len(text) + 16))()
        n_prompt = L.llama_tokenize(vocab, text, len(text), buf, len(buf), True, False)
        self.prompt_tokens = list(buf[:n_prompt])
        cparams = L.llama_context_default_params()
        cparams.n_ctx = max(256, n_prompt + tokens + 16)
        cparams.n_batch = cparams.n_ubatch = N_BATCH
        cparams.n_threads = cparams.n_threads_batch = threads
        cparams.flash_attn_type = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
                                   "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}[flash_attn]
        self.ctx = L.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise SystemExit("cannot create a llama context")
        self.mem = L.llama_get_memory(self.ctx)
        desc = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, desc, len(desc))
        self.info = {"model": str(model_path), "desc": desc.value.decode(), "model_bytes": L.llama_model_size(self.model),
                     "n_params": L.llama_model_n_params(self.model), "threads": threads, "flash_attn": flash_attn,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                     "prompt_tokens": n_prompt, "tokens": tokens, "matrix_types": tensor_types(model_path),
                     "llama_cpp_python": L.__version__}

    def _decode(self, toks: list[int]) -> int:
        import ctypes

        import numpy as np

        L = self.L
        for start in range(0, len(toks), N_BATCH):  # a prompt longer than the batch goes in batch-sized pieces
            piece = toks[start:start + N_BATCH]
            arr = (L.llama_token * len(piece))(*piece)
            if L.llama_decode(self.ctx, L.llama_batch_get_one(arr, len(piece))) != 0:
                raise SystemExit("llama_decode failed")
        logits = np.ctypeslib.as_array(ctypes.cast(L.llama_get_logits_ith(self.ctx, -1), ctypes.POINTER(ctypes.c_float)),
                                       shape=(self.n_vocab,))
        return int(logits.argmax())

    def run(self) -> tuple[float, float, list[int]]:
        """(prompt seconds, decode seconds, generated tokens) of one run."""
        self.L.llama_memory_clear(self.mem, True)
        t0 = time.perf_counter()
        tok = self._decode(self.prompt_tokens)
        t1 = time.perf_counter()
        out = [tok]
        for _ in range(self.tokens):
            tok = self._decode([tok])
            out.append(tok)
        return t1 - t0, time.perf_counter() - t1, out

    def free(self) -> None:
        self.L.llama_free(self.ctx)
        self.L.llama_model_free(self.model)


def cmd_decode(model_path: str, tokens: int, runs: int, threads: int, prompt: str,
               flash_attn: str = "auto", omp_wait_policy: str = "default") -> dict[str, Any]:
    dec_model = _Decoder(model_path, tokens, threads, prompt, flash_attn, omp_wait_policy)
    decode_s, prompt_s, generated = [], [], []
    for run in range(runs + 1):  # run 0 warms up
        p_s, d_s, generated = dec_model.run()
        if run:
            prompt_s.append(p_s)
            decode_s.append(d_s)
    dec = tokens / statistics.median(decode_s)
    result = dict(dec_model.info, runs=runs, decode_tok_s=dec, decode_tok_s_best=tokens / min(decode_s),
                  decode_tok_s_runs=[tokens / s for s in decode_s],
                  prompt_tok_s=len(dec_model.prompt_tokens) / statistics.median(prompt_s),
                  weight_gbs=dec_model.info["model_bytes"] * dec / 1e9,  # every weight byte read once per token
                  generated=generated[:16])
    dec_model.free()
    return result


def cmd_serve(model_path: str, tokens: int, threads: int, prompt: str, flash_attn: str = "auto",
              omp_wait_policy: str = "default") -> None:
    """Print {"ready": info} once loaded, then one JSON line per `run` line on stdin, until end of input."""
    dec_model = _Decoder(model_path, tokens, threads, prompt, flash_attn, omp_wait_policy)
    print(json.dumps({"ready": dec_model.info}), flush=True)
    for line in sys.stdin:
        if line.strip() != "run":
            raise SystemExit(f"unknown command {line.strip()!r}")
        p_s, d_s, generated = dec_model.run()
        print(json.dumps({"decode_tok_s": tokens / d_s, "decode_s": d_s,
                          "prompt_tok_s": len(dec_model.prompt_tokens) / p_s, "generated": generated[:16]}), flush=True)
    dec_model.free()


def table(kinds: list[str], tokens: int, runs: int, threads: int, pure: bool, as_json: bool) -> None:
    """SmolLM2 decode tok/s per type; works from any interpreter (each measurement runs in the venv)."""
    rows = []
    for kind in kinds:
        path = smollm2_variant(kind, pure)
        if not path.exists():
            convert(SMOLLM2, path, kind, pure)
        rows.append(dict(decode_tok_s(path, tokens, runs, threads), type=kind))
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    print(f"# llama.cpp decode, SmolLM2-135M-Instruct, batch 1, {threads} threads, {tokens} tokens, median of {runs}\n")
    print("| type | matrices | file MB | decode tok/s | best run | by OMP_WAIT_POLICY | prompt tok/s | weight GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        policies = ", ".join(f"{k} {v:.1f}" if v is not None else f"{k} abandoned"
                             for k, v in r["decode_tok_s_by_policy"].items())
        types = ", ".join(f"{v} {k}" for k, v in r["matrix_types"].items())
        print(f"| {r['type']} | {types} | {r['model_bytes'] / 1e6:.0f} | {r['decode_tok_s']:.1f} | "
              f"{r['decode_tok_s_best']:.1f} | {policies} | "
              f"{r['prompt_tok_s']:.0f} | {r['weight_gbs']:.1f} |")
    print("\n- converted files are re-quantized from the Q4_1 original (speed only, not quality); "
          "weight GB/s = llama_model_size x tok/s (every weight read once per token, embeddings included)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("decode", help="batch-1 greedy decode tokens/s")
    d.add_argument("model")
    d.add_argument("--tokens", type=int, default=64)
    d.add_argument("--runs", type=int, default=5)
    d.add_argument("--threads", type=int, default=2)
    d.add_argument("--prompt", default=PROMPT)
    d.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    d.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default",
                   help="OMP_WAIT_POLICY for ggml's OpenMP threads (default: leave the environment's)")
    sv = sub.add_parser("serve", help="like decode, one run per `run` line on stdin")
    sv.add_argument("model")
    sv.add_argument("--tokens", type=int, default=64)
    sv.add_argument("--threads", type=int, default=2)
    sv.add_argument("--prompt", default=PROMPT)
    sv.add_argument("--flash-attn", choices=("auto", "on", "off"), default="auto")
    sv.add_argument("--omp-wait-policy", choices=("default", "passive", "active"), default="default")
    q = sub.add_parser("quantize", help="llama_model_quantize IN OUT")
    q.add_argument("src")
    q.add_argument("dst")
    q.add_argument("--type", choices=sorted(FTYPES), required=True)
    q.add_argument("--pure", action="store_true", help="every matrix in --type (no Q6_K output etc.)")
    q.add_argument("--threads", type=int, default=2)
    t = sub.add_parser("table", help="SmolLM2 decode tok/s per llama.cpp type (converting missing files)")
    t.add_argument("--types", default="q4_1,q4_0,q8_0,f16,f32")
    t.add_argument("--tokens", type=int, default=64)
    t.add_argument("--runs", type=int, default=5)
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--pure", action="store_true")
    t.add_argument("--json", action="store_true")
    c = sub.add_parser("convert-smollm2", help=f"{SMOLLM2.name} -> {CONVERTED}/...: one file per type")
    c.add_argument("--types", default="q4_0,q8_0,f16,f32")
    c.add_argument("--pure", action="store_true")
    c.add_argument("--force", action="store_true", help="rebuild files that exist")
    args = parser.parse_args()
    if args.cmd == "decode":
        print(json.dumps(cmd_decode(args.model, args.tokens, args.runs, args.threads, args.prompt, args.flash_attn,
                                    args.omp_wait_policy)))
    elif args.cmd == "serve":
        cmd_serve(args.model, args.tokens, args.threads, args.prompt, args.flash_attn, args.omp_wait_policy)
    elif args.cmd == "quantize":
        print(json.dumps(cmd_quantize(args.src, args.dst, args.type, args.pure, args.threads)))
    elif args.cmd == "table":
        table(args.types.split(","), args.tokens, args.runs, args.threads, args.pure, args.json)
    else:
        for kind in args.types.split(","):
            dst = smollm2_variant(kind, args.pure)
            if dst.exists() and not args.force:
                print(json.dumps({"dst": str(dst), "type": kind, "exists": True, "bytes": dst.stat().st_size}))
                continue
            print(json.dumps(cmd_quantize(str(SMOLLM2), str(dst), kind, args.pure)), flush=True)


if __name__ == "__main__":
    sys.exit(main())
