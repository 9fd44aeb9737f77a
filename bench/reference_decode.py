"""Decode speed of the numpy reference executor next to transformers eager fp32, same model, same run.

The reference executor is the correctness oracle, not the fast path (that is TVM codegen); this
table is the baseline later kernels are measured against. Prints a markdown table headed by the host
line (bench/hostinfo.py: CPU, flags, streaming read bandwidth); --json prints JSON with "host".

The repetitions are interleaved (ours, transformers, ours, transformers, ...: hostinfo.interleaved) and
each side's figure is the median of its own, so the shared host's drift hits both alike.

    python bench/reference_decode.py [--tokens 32] [--repeats 3] [--json] [--smoke]

--smoke: TinyStories-656K only, 4 tokens, one repetition (tests/bench/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo,
# peers) are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line, interleaved  # noqa: E402

DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))


def ours_tok_s(model_path: Path, prompt: list[int], tokens: int) -> float:
    from bitsmith.compiler.loader import load_model
    from bitsmith.compiler.reference import ReferenceSession
    from bitsmith.passes.canonicalize import canonical_model

    model = canonical_model(load_model(model_path))
    session = ReferenceSession(model.module, model.weights, len(prompt) + tokens + 1)
    session.prefill(prompt)
    token = prompt[-1]
    t0 = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(session.decode(token)))
    return tokens / (time.perf_counter() - t0)


def transformers_tok_s(model, prompt: list[int], tokens: int) -> float:
    import torch

    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        t0 = time.perf_counter()
        for _ in range(tokens):
            out = model(token, past_key_values=past, use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    return tokens / (time.perf_counter() - t0)


def load_transformers(name: str):
    import torch
    from transformers import AutoModelForCausalLM

    if name == "tinystories-656k":
        return AutoModelForCausalLM.from_pretrained(DATA / name, dtype=torch.float32).eval()
    from bitsmith.compiler.default_model import default_model_path

    gguf = default_model_path()
    return AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                config=str(DATA / "smollm2-135m-instruct-q4_1")).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="TinyStories-656K only, 4 tokens, 1 repetition")
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"error: {DATA} not found (the real models live in ../shared/data; set BITSMITH_DATA)")
    models = {"tinystories-656k": DATA / "tinystories-656k"}
    if args.smoke:
        args.tokens, args.repeats = 4, 1
    else:
        from bitsmith.compiler.default_model import default_model_path

        models["smollm2-135m"] = default_model_path()
    host = host_info(gib=0.25 if args.smoke else 1.0, rounds=2 if args.smoke else 5)
    bandwidth = host["read_bandwidth_gbs"]
    prompt = [1, 5, 9, 13, 17, 21, 25, 29]
    rows = {}
    for name, path in models.items():
        peer = load_transformers(name)
        weight_bytes = sum(p.numel() * 4 for p in peer.parameters())
        runs = interleaved({"ours": lambda: ours_tok_s(path, prompt, args.tokens),
                            "transformers": lambda: transformers_tok_s(peer, prompt, args.tokens)}, args.repeats)
        ours, theirs = statistics.median(runs["ours"]), statistics.median(runs["transformers"])
        rows[name] = {"ours_tok_s": round(ours, 1), "transformers_tok_s": round(theirs, 1),
                      "ratio": round(ours / theirs, 2),
                      "limit_tok_s": round(bandwidth * 1e9 / weight_bytes, 1) if bandwidth else None}
    if args.json:
        print(json.dumps({"host": host, "read_bandwidth_gbs": bandwidth, "tokens": args.tokens,
                          "repeats": args.repeats, "models": rows}))
        return
    print(f"fp32 decode, batch 1, {args.tokens} tokens, median of {args.repeats} interleaved repetitions per side; "
          "limit = read bandwidth / fp32 weight bytes\n")
    print(f"- {host_line(host)}\n")
    print("| model | bitsmith reference tok/s | transformers eager tok/s | ratio | limit tok/s |")
    print("|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['ours_tok_s']} | {r['transformers_tok_s']} | {r['ratio']} | {r['limit_tok_s']} |")


if __name__ == "__main__":
    main()
