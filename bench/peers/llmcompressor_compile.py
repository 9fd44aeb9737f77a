"""Peer: llm-compressor's GPTQ or AWQ on CPU, timed as a compile (load, calibrate + quantize, save compressed).

Runs inside the peer venv (llm-compressor pins transformers <= 5.17; see bench/peers/setup_llmcompressor.sh).
Input: a JSON job on argv[1]; output: one JSON line with the seconds of each phase.
    {"model": HF dir, "calib": [[ids...], ...], "method": "gptq" | "awq", "bits": 4, "group": 32, "sym": true,
     "ignore": ["lm_head", "re:.*layers\\.0\\..*"], "dtype": "float32" | "bfloat16", "output": dir or null}

The caller measures wall time and peak RSS of this whole process (bench/compile_methods.py); the phases
printed here say where the time went. Settings mirror bitsmith's defaults: GPTQ with damping 0.01, blocks of
128 columns and static activation order (group scales from the original weight, columns in decreasing
diag(H) order); AWQ with llm-compressor's default mappings and a 20-point grid, then round-to-nearest with
the chosen scales (its QuantizationModifier).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch


def scheme(job: dict) -> dict:
    return {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": job["bits"], "type": "int", "symmetric": job["sym"],
                    "strategy": "group" if job["group"] > 0 else "channel",
                    **({"group_size": job["group"]} if job["group"] > 0 else {})},
    }}


def recipe(job: dict) -> list:
    if job["method"] == "gptq":
        from llmcompressor.modifiers.quantization import GPTQModifier

        return [GPTQModifier(config_groups=scheme(job), ignore=job["ignore"], dampening_frac=0.01, block_size=128,
                             actorder="static")]
    if job["method"] == "awq":
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [AWQModifier(n_grid=20), QuantizationModifier(config_groups=scheme(job), ignore=job["ignore"])]
    raise SystemExit(f"unknown method {job['method']!r}: use gptq or awq")


def cpu_only_pinning() -> bool:
    """llm-compressor 0.14's AWQ pins every cached activation before its grid search (for faster host-to-device
    copies), and torch refuses pin_memory without an accelerator: "RuntimeError: Cannot access accelerator
    device when none is available" on the first layer it smooths. On a CPU-only host there is no copy to
    speed up, so pinning becomes a no-op; nothing else changes. Returns whether it patched."""
    if torch.cuda.is_available():
        return False
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None
    return True


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    patched = cpu_only_pinning()
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, job["dtype"]))
    t1 = time.time()
    calib = Dataset.from_dict({"input_ids": job["calib"], "attention_mask": [[1] * len(x) for x in job["calib"]]})
    with tempfile.TemporaryDirectory() as tmp:
        out = job.get("output") or tmp
        oneshot(model=model, dataset=calib, recipe=recipe(job), num_calibration_samples=len(job["calib"]),
                max_seq_length=len(job["calib"][0]))
        t2 = time.time()
        model.save_pretrained(out, save_compressed=True)
        t3 = time.time()
    print(json.dumps({"load_s": round(t1 - t0, 1), "quantize_s": round(t2 - t1, 1), "save_s": round(t3 - t2, 1),
                      "torch_threads": torch.get_num_threads(), "dtype": job["dtype"],
                      "pin_memory_disabled": patched}))


if __name__ == "__main__":
    main()
