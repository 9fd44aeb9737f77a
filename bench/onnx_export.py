"""`bitsmith export --format onnx` run by onnxruntime: same greedy tokens as ours, logit distance, int8 activations
(accuracy_level 4), and decode speed next to our runtime on the same artifact.

    python bench/onnx_export.py ARTIFACT [--prompt TEXT] [--tokens 40] [--executor compiled|reference]
                                [--rounds 3] [--threads 0] [--work DIR] [--json]

Exports ARTIFACT twice (accuracy_level 0: float32 activations; 4: int8 activations per block), then:
1. greedy decode of --tokens tokens from the prompt: ours (--executor) and each export under onnxruntime
   (bitsmith/tools/onnx_session.py feeds the KV cache back); tokens compared, first divergence reported;
2. teacher-forced on ours' sequence (prompt + our tokens): top-1 agreement of each export's logits with ours,
   and the largest |logit difference| over the largest |logit| (prefill of the whole sequence, one step);
3. decode tokens/s at batch 1, rounds interleaved (ours, acc 0, acc 4, ours, ...), median of each.
The host line (bench/hostinfo.py) heads the table; bench/interop.md's ONNX section is written by hand from it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import host_info, host_line

from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.export import ExportOptions, export
from bitsmith.tools.onnx_session import OnnxSession
from bitsmith.tools.run import open_session


def greedy(session, prompt: list[int], n: int) -> tuple[list[int], float]:
    """(tokens, decode tokens/s): argmax decoding, the decode steps timed (not the prefill)."""
    session.reset()
    logits = session.prefill_last(prompt)
    out = [int(np.argmax(logits))]
    start = time.perf_counter()
    for _ in range(n - 1):
        out.append(int(np.argmax(session.decode(out[-1]))))
    return out, (n - 1) / (time.perf_counter() - start)


def first_divergence(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prompt", default="Once upon a time, there was a little girl named")
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--executor", default="compiled", choices=("compiled", "reference"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    host = host_info()
    work = args.work or Path(tempfile.mkdtemp(prefix="onnx-export-"))
    artifact = load_artifact(args.artifact)
    prompt = artifact.tokenizer().encode(args.prompt)
    result: dict = {"artifact": str(args.artifact), "executor": args.executor, "prompt_tokens": len(prompt),
                    "tokens": args.tokens, "host": host, "exports": {}}
    sessions = {"ours": open_session(artifact, args.executor, len(prompt) + args.tokens)}
    for level in (0, 4):
        out = work / f"acc{level}"
        start = time.perf_counter()
        report = export(args.artifact, out, ExportOptions("onnx", accuracy_level=level))
        size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
        result["exports"][level] = {"export_s": round(time.perf_counter() - start, 2), "bytes": size,
                                    "tensors": len(report.tensors), "exact": len(report.tensors) - len(report.requantized)}
        sessions[f"acc{level}"] = OnnxSession(out, threads=args.threads)
    runs: dict[str, list] = {name: [] for name in sessions}
    for _ in range(args.rounds):  # interleaved: a slow spell of the shared host lands on every side
        for name, session in sessions.items():
            runs[name].append(greedy(session, prompt, args.tokens))
    ours = runs["ours"][0][0]
    sequence = prompt + ours[:-1]
    sessions["ours"].reset()
    ref_logits = sessions["ours"].prefill(sequence)[len(prompt) - 1:]
    for name, session in sessions.items():
        tokens = runs[name][0][0]
        row = {"tok_s": round(statistics.median(r[1] for r in runs[name]), 1), "same_tokens": tokens == ours,
               "first_divergence": first_divergence(tokens, ours)}
        if name != "ours":
            session.reset()
            logits = session.prefill(sequence)[len(prompt) - 1:]
            row["top1_agree"] = round(float(np.mean(logits.argmax(-1) == ref_logits.argmax(-1))), 4)
            row["max_logit_diff_rel"] = float(np.abs(logits - ref_logits).max() / np.abs(ref_logits).max())
        result[name] = row
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(host_line(host))
    print(f"{args.artifact} ({args.executor}), prompt {len(prompt)} tokens, {args.tokens} greedy tokens, "
          f"{args.rounds} rounds")
    print("| run | decode tok/s | same greedy tokens | first divergence | top-1 agree (teacher-forced) | "
          "max abs logit diff / max abs logit |")
    print("|---|---|---|---|---|---|")
    for name in sessions:
        r = result[name]
        agree = r.get("top1_agree", "-")
        diff = f"{r['max_logit_diff_rel']:.2e}" if "max_logit_diff_rel" in r else "-"
        print(f"| {name} | {r['tok_s']} | {r['same_tokens']} | {r['first_divergence']} | {agree} | {diff} |")
    for level, e in result["exports"].items():
        print(f"export acc{level}: {e['export_s']} s, {e['bytes'] / 1e6:.1f} MB, {e['exact']}/{e['tensors']} exact")


if __name__ == "__main__":
    main()
