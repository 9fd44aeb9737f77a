"""compressed-tensors and GPTQ exports checked by their loaders on CPU: logits of the export vs our reference executor.

    python bench/export_hf.py [--plan PLAN.json] [--smollm2] [--gptqmodel-python PY] [--work DIR] [--json] [--smoke]

Cases: tinystories-656k int4-g32 and int8-g128 (RTN, every linear); a `bitsmith search` plan (--plan); SmolLM2-135M
from its Q4_1 GGUF requantized to int4-g32 sym (--smollm2: the GGUF's own min form has no exact HF layout).
Each artifact (target none) is exported to compressed-tensors and GPTQ; transformers + compressed-tensors loads
the first on CPU (fp32), GPTQModel's TorchLinear (fp16, its own venv: --gptqmodel-python) the second. Distances
are max |logits - ours| / max |ours| over one 20-token prompt; "float" is the same for the float artifact (the
size of the quantization itself, to read the others against). bench/interop.md is written by hand from this.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# bench/ last: its kernels.py must not shadow the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]
from hostinfo import host_info, host_line

from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
from bitsmith.pipeline import compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.export import ExportOptions, export
from bitsmith.tools.run import reference_session

DATA = Path(os.environ.get("BITSMITH_DATA", "/work/shared/data"))
SMOLLM2 = Path.home() / ".cache/bitsmith/models/SmolLM2-135M-Instruct.Q4_1.gguf"
IDS = [1, 5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 4, 50, 19, 7, 23, 64, 30, 11]
GPTQMODEL = ("import sys, numpy as np, torch\nfrom gptqmodel import BACKEND, GPTQModel\n"
             "m = GPTQModel.load(sys.argv[1], device='cpu', backend=BACKEND.TORCH, dtype=torch.float16)\n"
             "with torch.no_grad():\n"
             "    np.save(sys.argv[3], m.model(torch.tensor([[int(i) for i in sys.argv[2].split(',')]]))"
             ".logits[0].float().numpy())\n")


def compile_case(model: Path, out: Path, quant: QuantOptions) -> Path:
    opts = CompileOptions(quant=quant, memory=MemoryOptions(context=64), target=TargetOptions("none"))
    return compile_model(model, out, opts)


def distance(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    scale = float(np.abs(ref).max())
    return {"rel": float(np.abs(got - ref).max()) / scale, "top1": float((got.argmax(-1) == ref.argmax(-1)).mean())}


def transformers_logits(directory: Path, ids: list[int]) -> tuple[np.ndarray, float]:
    import torch
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float().numpy()
    return logits, time.perf_counter() - start


def gptqmodel_logits(python: str, directory: Path, ids: list[int], work: Path) -> np.ndarray | str:
    out = work / "gptqmodel_logits.npy"
    run = subprocess.run([python, "-c", GPTQMODEL, str(directory), ",".join(map(str, ids)), str(out)],
                         capture_output=True, text=True, timeout=900, check=False)
    return np.load(out) if run.returncode == 0 else run.stderr.strip().splitlines()[-1]


def run_case(name: str, model: Path, quant: QuantOptions, float_ref: np.ndarray | None, ids: list[int],
             args: argparse.Namespace) -> dict:
    work = Path(args.work) / name
    art = compile_case(model, work / "art", quant)
    ref = reference_session(load_artifact(art), 64).prefill(ids)
    row: dict = {"case": name, "ids": len(ids)}
    if float_ref is not None:
        row["float"] = distance(float_ref, ref)
    for fmt in ("compressed-tensors", "gptq"):
        out = work / fmt
        shutil.rmtree(out, ignore_errors=True)  # export refuses a non-empty directory: a rerun starts clean
        start = time.perf_counter()
        try:
            report = export(art, out, ExportOptions(fmt))
        except BitsmithError as exc:  # a refusal (e.g. GPTQ of a mixed plan) is a result here, reported as such
            row[fmt] = {"refused": str(exc).split(" (fix:")[0][-160:]}
            continue
        entry = {"export_s": round(time.perf_counter() - start, 2), "bytes": (out / "model.safetensors").stat().st_size,
                 "groups": [n for n in report.notes if "config_group" in n], "fused_notes": sum(
                     "fuse" in n for n in report.notes)}
        if fmt == "compressed-tensors":
            logits, seconds = transformers_logits(out, ids)
            entry.update(loader="transformers+compressed-tensors fp32", load_run_s=round(seconds, 1),
                         **distance(logits, ref))
        elif args.gptqmodel_python:
            logits = gptqmodel_logits(args.gptqmodel_python, out, ids, work)
            entry.update(loader="GPTQModel TorchLinear fp16", **(distance(logits, ref) if isinstance(
                logits, np.ndarray) else {"error": logits}))
        row[fmt] = entry
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", help="a `bitsmith search` plan.json for tinystories-656k")
    parser.add_argument("--smollm2", action="store_true", help="also SmolLM2-135M (Q4_1 GGUF, requantized int4-g32)")
    parser.add_argument("--gptqmodel-python", default=os.environ.get("BITSMITH_GPTQMODEL_PYTHON"))
    parser.add_argument("--work", default="/tmp/bench-export-hf")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="int4-g32 only, no GPTQModel (tests/bench)")
    args = parser.parse_args()
    if args.smoke:
        args.plan, args.smollm2, args.gptqmodel_python = None, False, None
    host = host_info()
    tiny = DATA / "tinystories-656k"
    float_ref = reference_session(load_artifact(compile_case(tiny, Path(args.work) / "float", QuantOptions())),
                                  64).prefill(IDS)
    rows = [run_case("tinystories int4-g32", tiny, QuantOptions("rtn", 4, 32, keep_default=False), float_ref, IDS,
                     args),
            run_case("tinystories int8-g128", tiny, QuantOptions("rtn", 8, 128, keep_default=False), float_ref, IDS,
                     args)][:1 if args.smoke else 2]
    if args.plan:
        from bitsmith.search.run import plan_to_overrides

        keep, planned = plan_to_overrides(Path(args.plan))
        rows.append(run_case("tinystories searched plan", tiny, QuantOptions("rtn", keep_default=False, keep=keep,
                                                                             schemes=tuple(planned)), float_ref, IDS,
                             args))
    if args.smollm2 and SMOLLM2.exists():
        quant = QuantOptions("rtn", 4, 32, keep_default=False, requantize=True)
        rows.append(run_case("SmolLM2-135M int4-g32 (from Q4_1)", SMOLLM2, quant, None, IDS, args))
    result = {"host": host, "smoke": args.smoke, "rows": rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(host_line(host))
    print("| case | format | loader | max abs logit diff / max | top-1 agree | bytes | export s |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if "float" in row:
            print(f"| {row['case']} | (float artifact) | our reference | {row['float']['rel']:.2e} | "
                  f"{row['float']['top1']:.2f} | | |")
        for fmt in ("compressed-tensors", "gptq"):
            e = row.get(fmt, {})
            if "refused" in e:
                print(f"| {row['case']} | {fmt} | refused: {e['refused']} | | | | |")
            elif "rel" in e:
                print(f"| {row['case']} | {fmt} | {e['loader']} | {e['rel']:.2e} | {e['top1']:.2f} | {e['bytes']} | "
                      f"{e['export_s']} |")
            elif e:
                print(f"| {row['case']} | {fmt} | {e.get('error', 'not loaded (no GPTQModel)')} | | | {e['bytes']} | "
                      f"{e['export_s']} |")


if __name__ == "__main__":
    main()
