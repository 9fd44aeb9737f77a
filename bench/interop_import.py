"""Lossless GGUF import, measured against llama.cpp on the same files: SmolLM2-135M Q4_1 perplexity and a
Q4_K_M file's greedy tokens.

    python bench/interop_import.py [--tokens 2048] [--ctx 512] [--executor reference|compiled] [--work DIR] [--json]

1. SmolLM2 Q4_1 (its tied embedding Q8_0), compiled three ways: imported (no --scheme: every matrix keeps its
   codes; once with --dtype float32, once with the default 16-bit storage of what stays dense), dequantized
   (--requantize, --dtype float32: the float model the codes stand for, the reference) and requantized, what
   bitsmith did before the import existed (--requantize --method rtn: int4 g128 sym, and int4 g32 asym).
   All are scored by `bitsmith eval`'s code on the same windows of wikitext-2 (tools/evaluate.py), and
   llama.cpp (llama-cpp-python, logits_all) scores the same token ids of the same windows of the same file,
   and of its F32 expansion (every tensor dequantized by gguf-py: the same values without llama.cpp's 8-bit
   activation rounding).
2. SmolLM2 Q4_K_M, made by llama_model_quantize with allow_requantize from the Q4_1 file (there is no
   HF SmolLM2 here), imported exactly: 64 greedy tokens, ours vs llama.cpp's on the file and on its F32 expansion,
   and llama.cpp's top two logits where it parts from ours.
Writes the JSON to --work/interop_import.json; bench/interop.md is written by hand from it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE), str(HERE / "peers"),
                                                                           str(HERE.parent / "tests" / "compiler"
                                                                               / "frontends")]

from hostinfo import host_info, host_line  # noqa: E402

SMOLLM2 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
TEXT = DATA / "wikitext-2-raw-test" / "wiki.test.raw"
PROMPT = "<|im_start|>user\nWhat is the capital of France, and why is it famous?<|im_end|>\n<|im_start|>assistant\n"


def compile_variant(src: Path, out: Path, target: str, **kw) -> Path:
    from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
    from bitsmith.pipeline import compile_model

    if (out / "manifest.json").exists():
        return out
    dtype = kw.pop("dtype", None)
    options = CompileOptions(dtype=dtype, quant=QuantOptions(**kw), target=TargetOptions(name=target),
                             memory=MemoryOptions(context=1024, kv_dtype="float32"))
    t0 = time.perf_counter()
    compile_model(src, out, options)
    print(f"compiled {out.name} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return out


def windows(artifact_dir: Path, tokens: int, ctx: int) -> list[list[int]]:
    """The token windows `bitsmith eval` scores (same tokenizer, same cut)."""
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.tools.evaluate import windows_of

    tok = load_artifact(artifact_dir, check_hashes=False).tokenizer()
    ids = tok.encode(TEXT.read_text(), add_bos=False)[:tokens]
    return windows_of(ids, ctx, tok.bos_token_id if tok.add_bos else None)


def ours_greedy(artifact_dir: Path, ids: list[int], n: int, executor: str) -> list[int]:
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.generate import generate
    from bitsmith.runtime.sampling import SamplingParams
    from bitsmith.tools.run import open_session

    session = open_session(load_artifact(artifact_dir), executor, len(ids) + n + 1)
    return [int(t) for t in generate(session, ids, n, SamplingParams(temperature=0.0))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--executor", choices=("reference", "compiled"), default="reference")
    ap.add_argument("--work", type=Path, default=Path("/tmp/bitsmith-interop-import"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    import llamacpp_gguf as peer
    from bitsmith.tools.evaluate import evaluate_many

    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    target = "host" if args.executor == "compiled" else "none"
    report: dict = {"host": host_info(), "tokens": args.tokens, "ctx": args.ctx, "executor": args.executor,
                    "source": str(SMOLLM2), "text": str(TEXT)}
    print(host_line(report["host"]), file=sys.stderr)

    # 1. perplexity: imported vs dequantized vs requantized vs llama.cpp, same windows
    arts = {"imported_f32": compile_variant(SMOLLM2, work / f"imported_f32_{target}", target, dtype="float32"),
            "imported": compile_variant(SMOLLM2, work / f"imported_{target}", target),
            "requantized_rtn_int4_g128_sym": compile_variant(SMOLLM2, work / f"requantized_g128_{target}", target,
                                                             requantize=True, method="rtn"),
            "requantized_rtn_int4_g32_asym": compile_variant(SMOLLM2, work / f"requantized_{target}", target,
                                                             requantize=True, method="rtn", group_size=32, sym=False),
            "dequantized_f32": compile_variant(SMOLLM2, work / "dequantized", "none", dtype="float32",
                                               requantize=True)}
    wins = windows(arts["imported"], args.tokens, args.ctx)
    t0 = time.perf_counter()
    names = ["imported_f32", "imported", "requantized_rtn_int4_g128_sym", "requantized_rtn_int4_g32_asym"]
    results = evaluate_many([arts[n] for n in names], TEXT.read_text(), args.tokens, args.ctx,
                            reference=arts["dequantized_f32"], executor=args.executor)
    report["eval_seconds"] = time.perf_counter() - t0
    report["ppl"] = {n: r.to_json() for n, r in zip(names, results)}
    report["ppl"]["dequantized_f32"] = {"ppl": results[0].ref_ppl}
    t0 = time.perf_counter()
    nll = peer.llamacpp_nll(SMOLLM2, wins, work)
    report["llamacpp"] = {"ppl": float(math.exp(nll.mean())), "tokens": int(nll.size),
                          "seconds": time.perf_counter() - t0}
    f32 = work / "SmolLM2-135M-Instruct.Q4_1.F32-expansion.gguf"
    if not f32.exists():
        peer.f32_expansion(SMOLLM2, f32)
    nll = peer.llamacpp_nll(f32, wins, work)
    report["llamacpp_f32_expansion"] = {"ppl": float(math.exp(nll.mean())), "tokens": int(nll.size)}
    for ref in ("llamacpp", "llamacpp_f32_expansion"):
        report[f"ppl_rel_diff_vs_{ref}"] = {n: report["ppl"][n]["ppl"] / report[ref]["ppl"] - 1
                                            for n in report["ppl"]}

    # 2. Q4_K_M from the Q4_1 file: greedy tokens, ours (imported exactly) vs llama.cpp
    kqm = work / "SmolLM2-135M-Instruct.from-Q4_1.Q4_K_M.gguf"
    if not kqm.exists():
        peer.quantize(SMOLLM2, kqm, "Q4_K_M", allow_requantize=True)
    report["q4_k_m_types"] = dict(Counter(peer.tensor_types(kqm).values()))
    art = compile_variant(kqm, work / f"q4_k_m_imported_{target}", target, dtype="float32")
    from bitsmith.runtime.artifact import load_artifact

    tok = load_artifact(art, check_hashes=False).tokenizer()
    ids = tok.encode(PROMPT, add_bos=False)
    ours = ours_greedy(art, ids, 64, args.executor)
    theirs = peer.llamacpp_greedy(kqm, ids, 64)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
    kqm_f32 = work / "SmolLM2-135M-Instruct.from-Q4_1.Q4_K_M.F32-expansion.gguf"
    if not kqm_f32.exists():
        peer.f32_expansion(kqm, kqm_f32)
    expanded = peer.llamacpp_greedy(kqm_f32, ids, 64)
    report["q4_k_m_greedy"] = {"prompt_tokens": len(ids), "ours": ours, "llamacpp": theirs, "equal_prefix": same,
                               "llamacpp_f32_expansion": expanded,
                               "equal_prefix_f32_expansion": next((i for i, (a, b) in enumerate(zip(ours, expanded))
                                                                   if a != b), len(ours)),
                               "text_ours": tok.decode(ours), "text_llamacpp": tok.decode(theirs)}
    if same < len(ours):  # where llama.cpp parts from ours: its own top two (batched, on the quantized file)
        row = peer.llamacpp_logits(kqm, ids + ours[:same], work)[-1]
        top = [int(t) for t in row.argsort()[::-1][:2]]
        report["q4_k_m_greedy"]["parting"] = {"tokens": [tok.decode([t]) for t in top],
                                              "logits": [float(row[t]) for t in top]}
    (work / "interop_import.json").write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
    else:
        for n, r in report["ppl"].items():
            print(f"{n:<32} ppl {r['ppl']:.4f}")
        print(f"{'llama.cpp (same windows)':<32} ppl {report['llamacpp']['ppl']:.4f}")
        print(f"{'llama.cpp, F32 expansion':<32} ppl {report['llamacpp_f32_expansion']['ppl']:.4f}")
        print(f"Q4_K_M greedy: {same}/64 tokens equal; types {report['q4_k_m_types']}")


if __name__ == "__main__":
    main()
