"""Peer: llm-compressor's GPTQ, optionally after its own rotations (SpinQuant/QuIP modifiers), on CPU, scored like ours.

Runs inside the peer venv (llm-compressor pins transformers <= 5.17; see bench/peers/setup_llmcompressor.sh).
Input: a JSON job on argv[1]; output: one JSON line with ppl, mean/p99 KLD and top-1 agreement against the
unquantized model (kept as a copy), the tokens scored and the seconds oneshot took.
    {"model": HF dir, "calib": [[ids...], ...], "eval_windows": [[ids...], ...], "bits": 4, "group": 128,
     "sym": true, "ignore": ["lm_head"], "rotation": "none"}
rotation: none | spinquant (R1+R2+R4, random Hadamard: QuaRot's matrices, what our --rotate hadamard folds) |
spinquant-learned (its learnable=True, which this version refuses) | quip (QuIP# input rotations, online).
With BOS in the windows (TinyStories) every text token is scored; without it the first token of a window is not
(bitsmith.tools.evaluate.windows_of): here the first position is never a target either way, as in ours.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch


def rotation_modifiers(rotation: str) -> list:
    """The llm-compressor modifiers that rotate the model before GPTQ (an empty list for none)."""
    if rotation == "none":
        return []
    if rotation in ("spinquant", "spinquant-learned"):
        from llmcompressor.modifiers.transform import SpinQuantModifier

        # "hadamard" (deterministic) needs power-of-two sizes; SmolLM2's hidden size is 576, so the random
        # Hadamard (a known Hadamard block times a power-of-two one, random signs) as QuaRot does
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard",
                                  learnable=rotation == "spinquant-learned")]
    if rotation == "quip":
        from llmcompressor.modifiers.transform import QuIPModifier

        return [QuIPModifier(rotations=["v"], transform_type="random-hadamard", ignore="lm_head")]
    raise SystemExit(f"unknown rotation {rotation!r}: use none, spinquant, spinquant-learned or quip")


def gptq_modifier(job: dict):
    from llmcompressor.modifiers.quantization import GPTQModifier

    weights = {"num_bits": job["bits"], "type": "int", "symmetric": job["sym"],
               "strategy": "group" if job["group"] > 0 else "channel",
               **({"group_size": job["group"]} if job["group"] > 0 else {})}
    return GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}},
                        ignore=job["ignore"], dampening_frac=0.01)


def score(model, reference, windows: list[list[int]]) -> dict:
    """ppl of the quantized model, and KL(reference || quantized) per predicted token, as bitsmith eval."""
    nll, kld, agree, ref_nll = [], [], [], []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window])
            targets, rows = ids[0, 1:], torch.arange(len(window) - 1)
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)  # [tokens - 1, vocab]
            ref_logp = torch.log_softmax(reference(ids).logits[0, :-1].double(), -1)
            nll.append(-logp[rows, targets])
            ref_nll.append(-ref_logp[rows, targets])
            kld.append((ref_logp.exp() * (ref_logp - logp)).sum(-1))
            agree.append((ref_logp.argmax(-1) == logp.argmax(-1)).double())
    nll, kld = torch.cat(nll), torch.cat(kld)
    return {"ppl": float(torch.exp(nll.mean())), "ref_ppl": float(torch.exp(torch.cat(ref_nll).mean())),
            "kld_mean": float(kld.mean()), "kld_p99": float(torch.quantile(kld, 0.99)),
            "top1_agree": float(torch.cat(agree).mean()), "tokens": int(nll.numel())}


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(job["model"], dtype=torch.float32)
    reference = copy.deepcopy(model).eval()  # the rotations untie and rewrite the model in place
    calib = Dataset.from_dict({"input_ids": job["calib"], "attention_mask": [[1] * len(x) for x in job["calib"]]})
    recipe = [*rotation_modifiers(job.get("rotation", "none")), gptq_modifier(job)]
    t0 = time.time()
    oneshot(model=model, dataset=calib, recipe=recipe, num_calibration_samples=len(job["calib"]),
            max_seq_length=len(job["calib"][0]), output_dir=None)
    seconds = time.time() - t0
    print(json.dumps({**score(model.eval(), reference, job["eval_windows"]), "seconds": round(seconds, 1)}))


if __name__ == "__main__":
    main()
