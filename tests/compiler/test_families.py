"""Every family in tests/family_zoo.py, as a user meets it: saved by transformers, compiled with the default target
(host kernels) and run on those kernels, against transformers in float32 on the same weights.

fp32: prefill logits of 5 tokens and 8 teacher-forced decode steps within RTOL of transformers' logits (relative to
their largest magnitude; float32 summation order is all that differs), and 8 greedy tokens equal. int8 RTN per
channel: top-1 agreement with the unquantized model on real text (`bitsmith eval`) at least TOP1_INT8.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.run import open_session
from family_zoo import ZOO, zoo_model

RTOL = 1e-4
TOP1_INT8 = 0.9
AWQ_VS_RTN = 1.25
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
    """The quantization's quality, scored on the numpy executor (`bitsmith eval --executor reference`): the
    kernels are checked against it above, and building each family's int8 kernels would double the suite's
    kernel builds."""
    from bitsmith.pipeline import TargetOptions
    from bitsmith.tools.evaluate import evaluate

    real_text_model(family, tmp_path / "hf", shared_data)
    options = CompileOptions(quant=QuantOptions("rtn", bits=8, group_size=-1, keep_default=False),
                             memory=MemoryOptions(context=128), target=TargetOptions("none"))
    art = compile_model(tmp_path / "hf", tmp_path / "art", options)
    text = (shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt").read_text()
    result = evaluate(art, text, tokens=512, ctx=64, executor="reference")
    print(f"{family}: int8 per-channel top-1 {result.top1_agree:.3f}, KLD {result.kld_mean:.2e}")
    assert result.top1_agree >= TOP1_INT8, f"{family}: top-1 agreement {result.top1_agree:.3f}"


def real_text_model(family: str, directory, shared_data):
    """The family's tiny model with the TinyStories tokenizer (vocabulary 2048), saved to `directory`."""
    from bitsmith.tools.synthetic import write_padded_tokenizer

    model = zoo_model(family, vocab_size=2048)
    model.save_pretrained(directory)
    write_padded_tokenizer(shared_data / "tinystories-656k", directory, 2048)
    return model


# one family per way the calibration walks a traced graph: layer names (transformer.h.N, gpt_neox.layers.N), tied
# and learned-position tables (gpt2), no pre-norm (olmo2), fused projections (phi3), sandwich norms and soft-caps
# (gemma2), the plain block (qwen3). All 17 dense families passed when this was first written (measured: GPTQ below
# RTN on each); the subset keeps the suite's time.
CALIBRATED = ("gemma2", "gpt2", "gpt_neox", "olmo2", "phi3", "qwen3")


@pytest.mark.parametrize("family", CALIBRATED)
def test_calibrated_methods_run_on_the_traced_families(family, tmp_path, shared_data):
    """GPTQ and AWQ int4 g32 calibrate layer by layer on the traced graph (layers found by name: layers.N,
    transformer.h.N, gpt_neox.layers.N): against RTN with the same scheme on real text, GPTQ's KL divergence
    from the unquantized model is lower and AWQ's at most AWQ_VS_RTN times RTN's (random weights have no salient
    channels for AWQ to protect)."""
    from bitsmith.pipeline import TargetOptions
    from bitsmith.tools.evaluate import evaluate_many

    real_text_model(family, tmp_path / "hf", shared_data)
    arts = []
    for method in ("rtn", "gptq", "awq"):
        options = CompileOptions(quant=QuantOptions(method, bits=4, group_size=32, keep_default=False),
                                 memory=MemoryOptions(context=128), target=TargetOptions("none"))
        arts.append(compile_model(tmp_path / "hf", tmp_path / method, options))
    text = (shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt").read_text()
    rtn, gptq, awq = (r.kld_mean for r in evaluate_many(arts, text, tokens=512, ctx=64, executor="reference"))
    print(f"{family}: int4 g32 KLD rtn {rtn:.2e} gptq {gptq:.2e} awq {awq:.2e}")
    assert 0 < gptq < rtn and 0 < awq <= AWQ_VS_RTN * rtn


@pytest.mark.parametrize("family", sorted(ZOO))
def test_cuda_target_lowers_every_family_as_the_registry_says(family, tmp_path):
    """Every kernel the family lowers to for CUDA is one the CUDA target builds (lowering checks each spec against
    the target; nvcc is not run here: tests/codegen/test_gpu_kernels.py builds the families)."""
    from bitsmith.compiler.architectures import BY_MODEL_TYPE
    from bitsmith.compiler.loader import load_model
    from bitsmith.pipeline import TargetOptions, run_pipeline

    model = zoo_model(family)
    model.save_pretrained(tmp_path)
    options = CompileOptions(memory=MEMORY, target=TargetOptions("cuda"))
    if BY_MODEL_TYPE[model.config.model_type].cuda:
        _, ctx = run_pipeline(load_model(tmp_path), options)
        assert ctx.lowered is not None and ctx.lowered.specs
    else:
        with pytest.raises(BitsmithError, match="no kernel on target cuda"):
            run_pipeline(load_model(tmp_path), options)


def test_registry_lists_exactly_the_families_tested_here():
    from bitsmith.compiler.architectures import ARCHITECTURES
    from family_zoo import zoo_config

    assert {zoo_config(f).model_type for f in ZOO} == {a.model_type for a in ARCHITECTURES}


def test_readme_table_is_the_registry():
    from bitsmith.compiler.architectures import support_table
    from conftest import REPO_ROOT

    readme = (REPO_ROOT / "README.md").read_text()
    table = readme.split("<!-- architectures:begin -->\n")[1].split("\n<!-- architectures:end -->")[0]
    assert table == support_table(), "regenerate the README table from `bitsmith architectures`"


def test_cli_lists_the_architectures():
    from click.testing import CliRunner

    from bitsmith.cli import main

    result = CliRunner().invoke(main, ["architectures"])
    assert result.exit_code == 0 and "| Gemma 2 | `gemma2` | torch.export |" in result.output
