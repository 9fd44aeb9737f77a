"""Decode tokens/s of a 2-of-8 mixture of experts vs the dense model of the same size, both on our compiled kernels.

    python bench/moe.py [--json] [--smoke] [--hidden 1024] [--inter 1024] [--experts 8] [--top-k 2] [--layers 4]
                        [--quant int8|int4|fp32] [--tokens 32] [--rounds 5] [--out FILE]

Two random-weight models (transformers, saved and compiled with `compile_model`, host kernels, RTN per channel
unless --quant fp32, every linear at the stated bits): a Mixtral with `experts` experts of intermediate size
`inter`, `top_k` chosen per token, and the dense-equivalent Mistral whose one MLP has intermediate size
experts * inter (the same total parameters, less the router's experts x hidden), same attention, vocabulary and
layers. Weights dominate the bytes (hidden 1024: the experts are most of the model). Each round times one greedy
decode run of each model after the same prompt (INTERLEAVED, ABAB...: a slow spell on this shared host hits both);
figures are the medians over rounds. Beside them: the weight bytes stored, and read per decode token (the MoE
reads only its chosen experts; from `inspect`), and the host line (bench/hostinfo.py).

--smoke: hidden 128, 1 layer, 4 tokens, one round, no bandwidth probe, no file written (tests/bench).
Without --smoke, writes bench/moe.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line, interleaved  # noqa: E402

PROMPT = [5, 17, 3, 9, 40, 41, 42, 43]
VOCAB = 2048


def configs(a: argparse.Namespace) -> dict[str, Any]:
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.hidden // 64,
                  num_key_value_heads=a.hidden // 128 or 1, max_position_embeddings=256, tie_word_embeddings=False)
    return {"moe": transformers.MixtralConfig(**common, intermediate_size=a.inter, num_local_experts=a.experts,
                                              num_experts_per_tok=a.top_k),
            "dense": transformers.MistralConfig(**common, intermediate_size=a.experts * a.inter, sliding_window=None)}


def build(name: str, config: Any, work: Path, a: argparse.Namespace) -> tuple[Path, float]:
    """Save a random model of `config` and compile it; (artifact, compile seconds)."""
    import torch
    import transformers

    from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(work / name)
    del model
    quant = QuantOptions() if a.quant == "fp32" else QuantOptions("rtn", bits=int(a.quant[3:]), group_size=-1,
                                                                  keep_default=False)
    options = CompileOptions(quant=quant, memory=MemoryOptions(context=64, concurrency=1, kv_dtype="float32"))
    t0 = time.time()
    path = compile_model(work / name, work / f"{name}.art", options)
    return path, time.time() - t0


class Decode:
    """An artifact loaded once; run() is one timed greedy decode of `tokens` after the prompt (tokens/s)."""

    def __init__(self, path: Path, tokens: int):
        from bitsmith.runtime.artifact import load_artifact
        from bitsmith.runtime.session import CompiledSession
        from bitsmith.tools.describe import describe

        self.session = CompiledSession(load_artifact(path), len(PROMPT) + tokens + 1)
        self.tokens = tokens
        summary, _ = describe(path)
        weights = sum(r["bytes"] for r in summary["precision"]["weights"].values()) if "precision" in summary \
            else sum(summary["bytes_by_dtype"].values())
        experts = summary.get("experts")
        self.stored = experts["weight_bytes"] if experts else weights
        self.read = experts["decode_bytes_per_token"] if experts else weights

    def run(self) -> float:
        import numpy as np

        self.session.reset()
        logits = self.session.prefill(PROMPT)[-1]
        t0 = time.perf_counter()
        for _ in range(self.tokens):
            logits = self.session.decode(int(np.argmax(logits)))
        return self.tokens / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--quant", default="int8", choices=["int8", "int4", "fp32"])
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", type=Path, default=HERE / "moe.md")
    a = p.parse_args()
    if a.smoke:
        a.hidden, a.inter, a.layers, a.tokens, a.rounds = 128, 64, 1, 4, 1
    host = host_info(probe=not a.smoke)
    with tempfile.TemporaryDirectory(prefix="bench-moe-") as tmp:
        work = Path(tmp)
        built = {name: build(name, cfg, work, a) for name, cfg in configs(a).items()}
        runs = {name: Decode(path, a.tokens) for name, (path, _) in built.items()}
        for r in runs.values():
            r.run()  # warm: first-call costs (thread pool, page faults) out of the timed rounds
        tok_s = interleaved({name: r.run for name, r in runs.items()}, a.rounds)
    rows = {name: {"tok_s": statistics.median(tok_s[name]), "rounds_tok_s": [round(v, 2) for v in tok_s[name]],
                   "stored_mb": runs[name].stored / 1e6, "read_mb_per_token": runs[name].read / 1e6,
                   "compile_s": round(built[name][1], 1)} for name in runs}
    speedup = rows["moe"]["tok_s"] / rows["dense"]["tok_s"]
    shape = (f"hidden {a.hidden}, {a.layers} layers, vocab {VOCAB}; MoE {a.top_k} of {a.experts} experts x inter "
             f"{a.inter}; dense MLP inter {a.experts * a.inter}; weights {a.quant}"
             + ("" if a.quant == "fp32" else " RTN per channel (every linear and expert)"))
    lines = [host_line(host), "", shape, "",
             "| model | decode tok/s (median) | rounds | weights stored MB | read per token MB | compile s |",
             "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['tok_s']:.2f} | {' '.join(f'{v:.1f}' for v in r['rounds_tok_s'])} | "
                     f"{r['stored_mb']:.1f} | {r['read_mb_per_token']:.1f} | {r['compile_s']} |")
    lines += ["", f"MoE / dense decode: {speedup:.2f}x (bytes read per token: dense / MoE "
              f"{rows['dense']['read_mb_per_token'] / rows['moe']['read_mb_per_token']:.2f}x)"]
    table = "\n".join(lines)
    print(table)
    if a.json:
        print(json.dumps({"host": host, "smoke": a.smoke, "shape": vars(a) | {"out": str(a.out)}, "rows": rows,
                          "speedup": speedup}))
    if not a.smoke:
        a.out.write_text(f"# MoE decode vs the dense-equivalent model\n\n`python bench/moe.py` "
                         f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n{table}\n")


if __name__ == "__main__":
    main()
