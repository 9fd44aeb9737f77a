"""`bitsmith export --format gguf` measured by llama.cpp on SmolLM2-135M: the exported file against the artifact.

    python bench/export_gguf.py [--tokens 4096] [--ctx 256] [--work DIR] [--json]

Artifacts, from the SmolLM2-135M-Instruct Q4_1 GGUF, host kernels (float32 activations):
  imported  --dtype float32: every matrix keeps its Q4_1 codes, the tied lm_head the Q8_0 table's, the table and
            norms stay float32 (exported: all tensors byte-identical to the source file's)
  rtn-g32   --requantize --method rtn --bits 4 --group 32 (sym; first/last layers 16-bit): exported as Q4_0 + F16
Each is exported, then: tensors byte-identical to the source file; 64 greedy tokens of `bitsmith run` (compiled)
and of llama.cpp on the export, for a chat prompt and a plain one (the first difference; llama.cpp's tokens fed
back through the artifact: where our argmax differs, by how many logits);
perplexity of `bitsmith eval`'s windows of wikitext-2 under both, and under llama.cpp on the source file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE), str(HERE.parent / "tests"
                                                                                            / "compiler" / "frontends")]

from hostinfo import host_info, host_line

SMOLLM2 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA = Path(os.environ.get("BITSMITH_DATA", HERE.parents[1] / "shared" / "data"))
CHAT = "What is the capital of France?"
PLAIN = "Once upon a time, there was a little girl named Lily. She"
VARIANTS = {"imported": ({}, "float32"), "rtn-g32": ({"method": "rtn", "bits": 4, "group_size": 32, "requantize": True},
                                                    None)}


def _compile(out: Path, quant: dict, dtype: str | None) -> Path:
    from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions
    from bitsmith.pipeline import compile_model

    if not (out / "manifest.json").exists():
        compile_model(SMOLLM2, out, CompileOptions(dtype=dtype, quant=QuantOptions(**quant),
                                                   memory=MemoryOptions(context=512)))
    return out


def _bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def _greedy(art, ids: list[int], gguf: Path) -> dict:
    """Free-running: how many of the 64 greedy tokens agree before the first difference; teacher-forced: llama.cpp's
    64 tokens fed through the artifact, where our argmax differs and by how many logits."""
    import llamacpp_gguf as peer

    from bitsmith.runtime.generate import generate
    from bitsmith.runtime.sampling import SamplingParams
    from bitsmith.tools.run import open_session

    ours = list(generate(open_session(art, "compiled", 512), ids, 64, SamplingParams(temperature=0.0), stop_ids=()))
    theirs = peer.llamacpp_greedy(gguf, ids, 64)
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), 64)
    logits = np.asarray(open_session(art, "compiled", 512).prefill(ids + theirs[:-1]))[len(ids) - 1:]
    gaps = logits.max(axis=-1) - logits[np.arange(64), theirs]
    return {"same_prefix": same, "teacher_forced_differences": [(i, round(float(g), 3)) for i, g in enumerate(gaps)
                                                                if g > 0]}


def measure(name: str, work: Path, tokens: int, ctx: int) -> dict:
    import llamacpp_gguf as peer

    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.tokenizer import encode_chat
    from bitsmith.tools.evaluate import evaluate, windows_of
    from bitsmith.tools.export import ExportOptions, export

    artifact = _compile(work / name, *VARIANTS[name])
    gguf = work / f"{name}.gguf"
    t0 = time.perf_counter()
    report = export(artifact, gguf, ExportOptions("gguf"))
    seconds = time.perf_counter() - t0
    source, ours = _bytes(SMOLLM2), _bytes(gguf)
    identical = sorted(n for n, v in ours.items() if source.get(n) == v or (n == "output.weight"
                                                                            and source["token_embd.weight"] == v))
    art = load_artifact(artifact)
    tok = art.tokenizer()
    chat = encode_chat(art.manifest["tokenizer"]["chat_template"], [{"role": "user", "content": CHAT}], tok)
    text = (DATA / "wikitext-2-raw-test" / "wiki.test.raw").read_text(encoding="utf-8")
    ev = evaluate(artifact, text, tokens, ctx, reference=artifact)
    wins = windows_of(tok.encode(text, add_bos=False)[:tokens], ctx, None)
    ppl = {"bitsmith eval": ev.ppl}
    for label, path in (("llama.cpp export", gguf), ("llama.cpp source", SMOLLM2)):
        folder = work / f"nll-{name}-{label.split()[-1]}"
        folder.mkdir(exist_ok=True)
        ppl[label] = float(np.exp(peer.llamacpp_nll(path, wins, folder).mean()))
    kinds: dict[str, int] = {}
    for t in report.tensors:
        kinds[t.target] = kinds.get(t.target, 0) + 1
    return {"variant": name, "export_s": round(seconds, 1), "bytes": gguf.stat().st_size, "types": kinds,
            "exact": sum(t.exact for t in report.tensors), "tensors": len(report.tensors),
            "identical_to_source": len(identical), "greedy_chat": _greedy(art, chat, gguf),
            "greedy_plain": _greedy(art, tok.encode(PLAIN, add_bos=False), gguf), "tokens": ev.tokens,
            "windows": ev.windows, "ppl": ppl, "rel_export_vs_eval": ppl["llama.cpp export"] / ev.ppl - 1}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--ctx", type=int, default=256)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bitsmith-export-gguf"))
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = [measure(v, args.work, args.tokens, args.ctx) for v in args.variants.split(",")]
    if args.json:
        print(json.dumps({"host": host_line(host_info(probe=False)), "rows": rows}, indent=1))
        return
    print(host_line(host_info(probe=False)))
    for r in rows:
        p = r["ppl"]
        print(f"{r['variant']}: {r['tensors']} tensors {r['types']} exact {r['exact']}, identical to source "
              f"{r['identical_to_source']}, {r['bytes']:,} B in {r['export_s']} s; greedy chat "
              f"{r['greedy_chat']}, plain {r['greedy_plain']}; PPL ({r['tokens']} tokens) eval "
              f"{p['bitsmith eval']:.4f}, llama.cpp export {p['llama.cpp export']:.4f} "
              f"({100 * r['rel_export_vs_eval']:+.2f}%), source {p['llama.cpp source']:.4f}")


if __name__ == "__main__":
    main()
