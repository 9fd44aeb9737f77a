"""Peer: llm-compressor's GPTQ (W4A16-style) on CPU, scored with the same perplexity protocol as `bitsmith eval`.

Runs inside the peer venv (llm-compressor pins transformers <= 5.17; see bench/peers/setup_llmcompressor.sh).
Input: a JSON job on argv[1]; output: one JSON line with ppl and the tokens scored.
    {"model": HF dir, "calib": [[ids...], ...], "eval_windows": [[ids...], ...], "bits": 4, "group": 128,
     "sym": true, "ignore": ["lm_head"]}
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    calib = Dataset.from_dict({"input_ids": job["calib"], "attention_mask": [[1] * len(x) for x in job["calib"]]})
    scheme = {
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": job["bits"], "type": "int", "symmetric": job["sym"],
                        "strategy": "group" if job["group"] > 0 else "channel",
                        **({"group_size": job["group"]} if job["group"] > 0 else {})},
        }},
        "ignore": job["ignore"],
    }
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        oneshot(model=model, dataset=calib, recipe=GPTQModifier(config_groups=scheme["config_groups"],
                                                               ignore=scheme["ignore"], dampening_frac=0.01),
                num_calibration_samples=len(job["calib"]), max_seq_length=len(job["calib"][0]), output_dir=tmp)
    seconds = time.time() - t0
    nll = []
    model.eval()
    with torch.no_grad():
        for window in job["eval_windows"]:
            ids = torch.tensor([window])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            nll.append(-logp[torch.arange(len(window) - 1), ids[0, 1:]])
    nll = torch.cat(nll)
    print(json.dumps({"ppl": float(torch.exp(nll.mean())), "tokens": int(nll.numel()), "seconds": seconds}))


if __name__ == "__main__":
    main()
