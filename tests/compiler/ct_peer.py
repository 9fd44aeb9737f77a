"""Peer script (run by the llm-compressor venv's python, not imported by pytest): quantize a tiny HF model with
llm-compressor into compressed-tensors pack-quantized directories, then load each back with transformers and the
compressed-tensors decompressor and write what they give: every dense weight and the float32 logits.

    python ct_peer.py JOB.json      JOB: {"model": HF dir, "out": dir, "ids": [...], "calib": [[...], ...],
                                          "variants": [{"name", "dtype", "method": "rtn"|"gptq", "weights": {...}}],
                                          "crosscheck": npz of packed streams to unpack (optional)}
Writes OUT/NAME/ (the checkpoint) and OUT/NAME.npz (weights "w:<name>" float32, "logits" float32).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch


def word_tokenizer(vocab: int):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({str(i): i for i in range(vocab)},
                                                                               unk_token="0")))


def quantize(job: dict, variant: dict, out: Path) -> None:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=getattr(torch, variant["dtype"]))
    groups = {"group_0": {"targets": ["Linear"], "weights": {"type": "int", **variant["weights"]}}}
    if variant["method"] == "gptq":
        calib = Dataset.from_dict({"input_ids": job["calib"], "attention_mask": [[1] * len(x) for x in job["calib"]]})
        oneshot(model=model, dataset=calib, recipe=GPTQModifier(config_groups=groups, ignore=["lm_head"]),
                processor=word_tokenizer(model.config.vocab_size),  # oneshot wants one with a dataset; unused
                num_calibration_samples=len(job["calib"]), max_seq_length=len(job["calib"][0]))
    else:
        oneshot(model=model, recipe=QuantizationModifier(config_groups=groups, ignore=["lm_head"]))
    model.save_pretrained(out, save_compressed=True)


def reference(job: dict, directory: Path, npz: Path) -> None:
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model = AutoModelForCausalLM.from_pretrained(
        directory, quantization_config=CompressedTensorsConfig(run_compressed=False))
    dense = {f"w:{k}": v.detach().float().numpy() for k, v in model.state_dict().items() if k.endswith(".weight")}
    model = model.float().eval()
    with torch.no_grad():
        logits = model(torch.tensor([job["ids"]])).logits[0].numpy()
    np.savez(npz, logits=logits, **dense)


def crosscheck(path: Path) -> None:
    """Unpack the test's packed streams ("b<bits>_d<packed dim>", codes [64, 96]) with compressed-tensors' own
    unpacker; write the unsigned codes beside them."""
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    packed = np.load(path)
    codes = {}
    for key in packed.files:
        bits, dim = int(key[1]), int(key[-1])
        signed = unpack_from_int32(torch.from_numpy(packed[key]), bits, torch.Size((64, 96)), packed_dim=dim)
        codes[key] = signed.to(torch.int32).numpy() + (1 << (bits - 1))
    np.savez(path.with_name(path.stem + "_unpacked.npz"), **codes)


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    out = Path(job["out"])
    if job.get("crosscheck"):
        crosscheck(Path(job["crosscheck"]))
    for variant in job["variants"]:
        quantize(job, variant, out / variant["name"])
        reference(job, out / variant["name"], out / f"{variant['name']}.npz")
    print(json.dumps({"ok": [v["name"] for v in job["variants"]]}))


if __name__ == "__main__":
    main()
