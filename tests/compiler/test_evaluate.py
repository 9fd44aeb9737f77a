"""`eval`: perplexity equals transformers under the stated protocol; KLD against a reference behaves."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.tools.evaluate import evaluate, windows_of
from bitsmith.pipeline import CompileOptions, compile_model
from bitsmith.errors import BitsmithError


def test_windows_protocol():
    assert windows_of(list(range(7)), 3, bos=1) == [[1, 0, 1, 2], [1, 3, 4, 5]]
    assert windows_of(list(range(7)), 3, bos=None) == [[0, 1, 2], [3, 4, 5]]


@pytest.fixture
def tinystories(shared_data, tmp_path):
    model = shared_data / "tinystories-656k"
    text = (shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt").read_text()[:40000]
    return model, text, compile_model(model, tmp_path / "fp32", CompileOptions())


def test_perplexity_equals_transformers(tinystories):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, text, art = tinystories
    result = evaluate(art, text, tokens=2048, ctx=256)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text, add_special_tokens=False).input_ids[:2048]
    nll = []
    with torch.no_grad():
        for start in range(0, 2048, 256):
            window = torch.tensor([[1] + ids[start:start + 256]])
            logp = torch.log_softmax(model(window).logits[0, :-1].double(), -1)
            nll.append(-logp[torch.arange(256), window[0, 1:]])
    expected = float(torch.exp(torch.cat(nll).mean()))
    assert result.tokens == 2048 and result.bos
    assert result.ppl == pytest.approx(expected, rel=1e-4)
    assert result.kld_mean == 0.0 and result.top1_agree == 1.0  # unquantized: its own reference


def test_kld_against_a_narrower_copy(tinystories, tmp_path):
    model_dir, text, art = tinystories
    bf16 = compile_model(model_dir, tmp_path / "bf16", CompileOptions(dtype="bfloat16"))
    result = evaluate(art, text, tokens=1024, ctx=256, reference=bf16)
    # The checkpoint's values are exactly representable in bf16 (see its README): the copies agree exactly.
    assert result.kld_mean == pytest.approx(0.0, abs=1e-9) and result.top1_agree == 1.0
    # A perturbed copy: KLD grows with the noise, and top-1 agreement falls.
    from bitsmith.compiler.artifact import write_artifact
    from bitsmith.compiler.loader import load_model
    from bitsmith.passes.canonicalize import canonical_model

    model = canonical_model(load_model(model_dir))
    rng = np.random.default_rng(0)
    results = []
    for noise in (0.01, 0.1):
        weights = {k: (v + noise * v.std() * rng.standard_normal(v.shape)).astype(np.float32) if v.ndim == 2 else v
                   for k, v in ((k, np.asarray(v)) for k, v in model.weights.items())}  # read from the checkpoint
        noisy = write_artifact(tmp_path / f"noisy{noise}", model.module, weights, model.tokenizer, model.config, {},
                               model.source)
        # written without kernels: scored on the reference executor, which has to be asked for
        results.append(evaluate(noisy, text, tokens=1024, ctx=256, reference=art, executor="reference"))
    small, large = results
    assert 0 < small.kld_mean < large.kld_mean and small.kld_p99 >= small.kld_mean
    assert large.top1_agree < small.top1_agree <= 1.0
    # the same reference, scored on the numpy executor here and on its kernels above: summation order only
    assert small.ref_ppl == pytest.approx(result.ppl, rel=1e-5) and large.ppl > small.ppl


def test_too_short_text_is_refused(tinystories):
    _, _, art = tinystories
    with pytest.raises(BitsmithError, match="fewer than one window"):
        evaluate(art, "Once upon a time", tokens=None, ctx=256)
