"""Every family in tests/family_zoo.py, as a user meets it: saved by transformers, compiled with the default target
(host kernels) and run on those kernels, against transformers in float32 on the same weights.

fp32: prefill logits of 5 tokens and 8 teacher-forced decode steps within RTOL of transformers' logits (relative to
their largest magnitude; float32 summation order is all that differs), and 8 greedy tokens equal. int8 RTN per
channel: top-1 agreement with the unquantized model on real text (`bitsmith eval`) at least TOP1_INT8.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.run import open_session
from family_zoo import ZOO, zoo_model

RTOL = 1e-4
TOP1_INT8 = 0.9
PROMPT = [5, 9, 13, 2, 7, 40, 41]
STEPS = 8
MEMORY = MemoryOptions(context=64, kv_dtype="float32")  # fp32 KV: the weights are the only thing compared


def teacher_forced(session, ids: list[int], n_prefill: int = 5) -> np.ndarray:
    rows = [np.asarray(session.prefill(ids[:n_prefill]))]
    rows += [np.asarray(session.decode(t))[None] for t in ids[n_prefill:]]
    return np.concatenate(rows)


def greedy_ours(session, prompt: list[int]) -> list[int]:
    logits, tokens = np.asarray(session.prefill(prompt))[-1], []
    for _ in range(STEPS):
        tokens.append(int(np.argmax(logits)))
        logits = np.asarray(session.decode(tokens[-1]))
    return tokens


def greedy_transformers(model, prompt: list[int]) -> list[int]:
    import torch

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(STEPS):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("family", sorted(ZOO))
def test_family_compiles_to_kernels_that_match_transformers(family, tmp_path):
    import torch

    model = zoo_model(family)
    model.save_pretrained(tmp_path / "hf")
    art = load_artifact(compile_model(tmp_path / "hf", tmp_path / "art", CompileOptions(memory=MEMORY)))
    assert art.manifest["kernels"] is not None
    ids = [int(t) for t in np.random.default_rng(1).integers(3, model.config.vocab_size, size=13)]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    ours = teacher_forced(open_session(art), ids)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"{family}: max relative error {err:.2e}"
    assert greedy_ours(open_session(art), PROMPT) == greedy_transformers(model, PROMPT)


@pytest.mark.parametrize("family", sorted(ZOO))
def test_int8_per_channel_keeps_top1_on_real_text(family, tmp_path, shared_data):
    from bitsmith.tools.evaluate import evaluate
    from bitsmith.tools.synthetic import write_padded_tokenizer

    tokenizer_dir = shared_data / "tinystories-656k"
    model = zoo_model(family, vocab_size=2048)  # the TinyStories tokenizer's vocabulary
    model.save_pretrained(tmp_path / "hf")
    write_padded_tokenizer(tokenizer_dir, tmp_path / "hf", 2048)
    options = CompileOptions(quant=QuantOptions("rtn", bits=8, group_size=-1, keep_default=False),
                             memory=MemoryOptions(context=128))
    art = compile_model(tmp_path / "hf", tmp_path / "art", options)
    text = (shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt").read_text()
    result = evaluate(art, text, tokens=512, ctx=64)
    print(f"{family}: int8 per-channel top-1 {result.top1_agree:.3f}, KLD {result.kld_mean:.2e}")
    assert result.top1_agree >= TOP1_INT8, f"{family}: top-1 agreement {result.top1_agree:.3f}"
