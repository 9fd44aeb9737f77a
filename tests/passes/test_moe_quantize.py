"""Stacked expert tensors through the precision plan, RTN per expert slice, pack (moe -> qmoe), expert usage and inspect."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.loader import load_model
from bitsmith.errors import BitsmithError
from bitsmith.options import CalibrationOptions
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, TargetOptions, compile_model, run_pipeline
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.runtime.quant_scheme import QuantScheme
from bitsmith.tools.describe import describe, format_summary
from family_zoo import zoo_model

NONE = TargetOptions("none")
CALIB = CalibrationOptions(samples=4, seqlen=64)


def _saved(tmp_path, family="mixtral", tokenizer=None, **overrides):
    model = zoo_model(family, **overrides)
    model.save_pretrained(tmp_path / "hf")
    if tokenizer is not None:
        from bitsmith.tools.synthetic import write_padded_tokenizer

        write_padded_tokenizer(tokenizer / "tinystories-656k", tmp_path / "hf", model.config.vocab_size)
    return model, tmp_path / "hf"


def test_rtn_quantizes_each_expert_slice_with_its_own_scales(tmp_path):
    model, path = _saved(tmp_path)
    options = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False), target=NONE)
    module, ctx = run_pipeline(load_model(path), options)
    name = "layers.1.mlp.experts.down_proj"
    assert module.meta["precision_plan"][name]["bits"] == 4
    assert module.meta["precision_plan"]["layers.1.mlp.experts.gate_up_proj"]["bits"] == 4
    w = model.model.layers[1].mlp.experts.down_proj.detach().numpy()  # [E, H, I]
    scales = ctx.weights[f"{name}.scales"]
    assert ctx.weights[f"{name}.qweight"].shape[0] == scales.shape[0] == w.shape[0]
    for e in range(w.shape[0]):
        np.testing.assert_array_equal(scales[e], quantize_rtn(w[e], QuantScheme(4, 32, True, "rtn")).scales)
    assert [n.op for n in module["decode"].nodes].count("qmoe") == 2 and "moe" not in {n.op for n in module["decode"].nodes}


def test_experts_can_stay_16_bit_by_pattern(tmp_path):
    _, path = _saved(tmp_path)
    options = CompileOptions(quant=QuantOptions("rtn", bits=8, group_size=-1, keep_default=False,
                                                keep=("*.experts.*",)), target=NONE)
    module, _ = run_pipeline(load_model(path), options)
    ops = {n.op for n in module["decode"].nodes}
    assert "moe" in ops and "qmoe" not in ops and "qlinear" in ops


def test_one_block_with_two_schemes_is_refused(tmp_path):
    _, path = _saved(tmp_path)
    options = CompileOptions(quant=QuantOptions("rtn", bits=8, group_size=-1, keep_default=False,
                                                schemes=(("layers.0.mlp.experts.down_proj", "int4"),)), target=NONE)
    with pytest.raises(BitsmithError, match="different schemes"):
        run_pipeline(load_model(path), options)


def test_awq_on_experts_is_refused_with_an_override_as_fix(tmp_path, shared_data):
    _, path = _saved(tmp_path, tokenizer=shared_data, vocab_size=2048)
    awq = QuantOptions("awq", bits=4, group_size=32, keep_default=False, calibration=CALIB)
    with pytest.raises(BitsmithError, match="AWQ on stacked expert weights") as err:
        run_pipeline(load_model(path), CompileOptions(quant=awq, target=NONE))
    assert "*.experts.*=int4-gptq" in err.value.fix
    mixed = QuantOptions("awq", bits=4, group_size=32, keep_default=False, calibration=CALIB,
                         schemes=(("*.experts.*", "int8-rtn"),))
    module, ctx = run_pipeline(load_model(path), CompileOptions(quant=mixed, target=NONE))
    assert ctx.quantized["layers.0.mlp.experts.gate_up_proj"].scheme.method == "rtn"
    assert ctx.quantized["layers.0.self_attn.q_proj.weight"].scheme.method == "awq"
    assert "layers.0.mlp.experts.gate_up_proj" not in ctx.weights  # the dequantized stand-in is gone


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_gptq_per_expert_beats_rtn_on_real_text(family, tmp_path, shared_data):
    """GPTQ int4 g32 with one Hessian per expert (the rows routed to it): lower KL divergence from the float
    model than RTN with the same scheme, on real text (reference executor)."""
    from bitsmith.tools.evaluate import evaluate_many

    _, path = _saved(tmp_path, family, tokenizer=shared_data, vocab_size=2048)
    arts = []
    for method in ("rtn", "gptq"):
        quant = QuantOptions(method, bits=4, group_size=32, keep_default=False)
        arts.append(compile_model(path, tmp_path / method, CompileOptions(quant=quant, memory=MemoryOptions(context=128),
                                                                          target=NONE)))
    plan = __import__("json").loads((tmp_path / "gptq" / "manifest.json").read_text())["ir"]["meta"]["precision_plan"]
    assert plan["layers.1.mlp.experts.down_proj"]["method"] == "gptq"
    text = (shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt").read_text()
    rtn, gptq = (r.kld_mean for r in evaluate_many(arts, text, tokens=512, ctx=64, executor="reference"))
    print(f"{family}: int4 g32 KLD rtn {rtn:.2e} gptq {gptq:.2e}")
    assert 0 < gptq < rtn


def test_inspect_shows_expert_usage_and_bytes_read_per_token(tmp_path, shared_data):
    _, path = _saved(tmp_path, "olmoe", tokenizer=shared_data, vocab_size=2048)
    options = CompileOptions(quant=QuantOptions("rtn", bits=8, group_size=-1, keep_default=False, calibration=CALIB),
                             memory=MemoryOptions(context=64), target=NONE)
    summary, _ = describe(compile_model(path, tmp_path / "art", options))
    experts = summary["experts"]
    block = experts["blocks"]["layers.0.mlp"]
    freq = [e["frequency"] for e in block["per_expert"]]
    assert block["tokens"] == 4 * 64 and abs(sum(freq) - block["top_k"]) < 1e-2  # each token picks top_k experts
    assert block["per_expert"][3]["expert"] == "layers.0.mlp.experts[3]"
    # all experts stored, only top_k of E read per decode token
    assert experts["weight_bytes"] - experts["decode_bytes_per_token"] == experts["expert_bytes"] * (1 - 2 / 4)
    text = format_summary(summary)
    assert "a decode token reads" in text and "layers.1.mlp.experts[0..3]" in text and "usage on 256" in text


def test_cuda_target_refuses_the_moe_ops_by_name(tmp_path):
    """No CUDA MoE kernels yet: the compile stops in lower_to_kernels naming the op, no silent fallback."""
    _, path = _saved(tmp_path)
    with pytest.raises(BitsmithError, match=r"op router .* has no kernel on target cuda.*builds no RouterSpec") as err:
        compile_model(path, tmp_path / "art", CompileOptions(target=TargetOptions("cuda"),
                                                              memory=MemoryOptions(context=64)))
    assert "--target none" in err.value.fix
    assert not (tmp_path / "art").exists()


def test_memory_plan_counts_every_expert(tmp_path):
    _, path = _saved(tmp_path)
    summary, _ = describe(compile_model(path, tmp_path / "art", CompileOptions(memory=MemoryOptions(context=64),
                                                                                target=NONE)))
    experts = summary["experts"]
    assert summary["memory_plan"]["weights"] >= experts["weight_bytes"] > experts["decode_bytes_per_token"]


def test_default_policy_keeps_routers_16_bit(tmp_path):
    _, path = _saved(tmp_path, num_hidden_layers=3)
    plan = run_pipeline(load_model(path), CompileOptions(quant=QuantOptions("rtn", bits=4), target=NONE))[0].meta[
        "precision_plan"]
    assert plan["layers.1.mlp.gate.weight"] is None  # a middle layer's router: kept by the default policy
    assert plan["layers.1.mlp.experts.gate_up_proj"]["bits"] == 4 and plan["layers.1.self_attn.q_proj.weight"]
