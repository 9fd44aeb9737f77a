"""Pre-quantized weights from a frontend (LoadedModel.quantized) are packed as they are, never requantized."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.reference import run_function
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import AssignPrecision, override_scheme
from bitsmith.passes.base import PassContext
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, run_pipeline
from bitsmith.passes.quantize_weights import QuantizeWeights, dequantized_weight
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize, parse_scheme
from conftest import RANDOM_CONFIGS, random_model

MEMORY = MemoryOptions(context=64)
FORMS = {  # the GGUF mappings (and an act-order GPTQ one) that need new stored parts
    "layers.0.self_attn.q_proj.weight": ("int4-g32-sym-imported", "Q4_0"),
    "layers.0.mlp.gate_proj.weight": ("int4-g32-min-imported", "Q4_1"),
    "layers.1.mlp.up_proj.weight": ("int6-g16-sym-s256-imported", "Q6_K"),
    "layers.1.self_attn.v_proj.weight": ("int4-g32-asym-imported", "gptq"),
}


def imported_weight(scheme_text: str, shape: tuple[int, int], rng: np.random.Generator, perm: bool) -> QuantizedWeight:
    scheme = parse_scheme(scheme_text)
    out, n_in = shape
    ng, ns = scheme.n_groups(n_in), scheme.n_super(n_in)
    q = rng.integers(0, 1 << scheme.bits, shape, dtype=np.uint8)
    if scheme.super_group:
        scales, supers = rng.integers(-20, 20, (out, ng), dtype=np.int8), (0.01 * rng.random((out, ns))).astype(np.float16)
        return QuantizedWeight(q, scales, None, scheme, n_in, super_scales=supers)
    scales = (0.05 * rng.random((out, ng)) + 0.01).astype(np.float16)
    zeros = None if scheme.sym else (-scales * 8 if scheme.offset else rng.integers(0, 16, (out, ng))).astype(np.float16)
    return QuantizedWeight(q, scales, zeros, scheme, n_in, perm=rng.permutation(n_in).astype(np.int32) if perm else None)


def imported_model(config_name: str = "gqa") -> tuple[LoadedModel, dict[str, QuantizedWeight]]:
    rng = np.random.default_rng(0)
    module, weights = random_model(RANDOM_CONFIGS[config_name])
    quantized = {}
    for name, (text, _) in FORMS.items():
        qw = imported_weight(text, weights[name].shape, rng, perm=text.endswith("asym-imported"))
        quantized[name], weights[name] = qw, dequantize(qw)
    model = LoadedModel(module, weights, None, {"max_position": 128}, {"format": "test"}, "float32", quantized,
                        {name: source for name, (_, source) in FORMS.items()})
    return model, quantized


def test_imported_codes_are_packed_as_they_are():
    model, quantized = imported_model()
    module, ctx = run_pipeline(model, CompileOptions(memory=MEMORY))  # no --method: only the imported weights
    plan = module.meta["precision_plan"]
    assert {name for name, scheme in plan.items() if scheme} == set(FORMS)  # edge layers (0 and 1) too
    assert module.meta["imported_types"] == {name: source for name, (_, source) in FORMS.items()}
    for name, qw in quantized.items():
        assert ctx.quantized[name].scheme == qw.scheme and ctx.quantized[name].has_perm == (qw.perm is not None)
        assert np.array_equal(dequantized_weight(ctx, name), dequantize(qw))  # bit for bit
    qlinears = [n for n in module["prefill"].nodes if n.op == "qlinear"]
    assert len(qlinears) == len(FORMS)
    gate = next(n for n in qlinears if "gate_proj" in n.inputs[1])
    assert gate.attrs["offset"] is True and len(gate.inputs) == 4  # x, qweight, scales, zeros (offsets)
    up = next(n for n in qlinears if "up_proj" in n.inputs[1])
    assert up.attrs["super_group"] == 256 and [v.rsplit(".", 1)[1] for v in up.inputs[1:]] == [
        "qweight", "scales", "super_scales"]


def test_imported_sym_int4_runs_in_the_reference_executor():
    model, quantized = imported_model()
    name = "layers.0.self_attn.q_proj.weight"
    model.quantized = {name: quantized[name]}  # the form the reference qlinear has always known
    module, ctx = run_pipeline(model, CompileOptions(dtype="float32", memory=MEMORY))  # dense weights as they are
    float_module, _ = run_pipeline(model, CompileOptions(dtype="float32", memory=MEMORY,
                                                         quant=QuantOptions(requantize=True)))
    inputs = lambda: {"tokens": np.array([3, 1, 4, 1, 5]), "positions": np.arange(5),
                      "kv_cache": np.zeros((2, 2, 8, 2, 8), np.float32)}
    got = run_function(module["prefill"], ctx.weights, inputs())[0]
    want = run_function(float_module["prefill"], model.weights, inputs())[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_requantize_and_overrides():
    model, _ = imported_model()
    module, ctx = run_pipeline(model, CompileOptions(memory=MEMORY, quant=QuantOptions(requantize=True)))
    assert not ctx.quantized and "imported_types" not in module.meta  # --requantize, no scheme: all float
    options = CompileOptions(memory=MEMORY, quant=QuantOptions(schemes=(("layers.0.mlp.gate_proj", "int8"),)))
    module, ctx = run_pipeline(model, options)
    gate = ctx.quantized["layers.0.mlp.gate_proj.weight"]
    assert gate.scheme.method == "rtn" and gate.scheme.bits == 8 and gate.source_type is None  # requantized
    assert ctx.quantized["layers.1.mlp.up_proj.weight"].source_type == "Q6_K"  # the others stay exact
    assert "layers.1.mlp.down_proj.weight" not in ctx.quantized  # a --scheme pattern alone touches what it names


def test_codes_for_a_weight_the_ir_lacks_are_refused():
    model, quantized = imported_model()
    model.quantized = {"layers.7.mlp.up_proj.weight": next(iter(quantized.values()))}
    with pytest.raises(BitsmithError, match="not a linear weight"):
        run_pipeline(model, CompileOptions(memory=MEMORY))


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_quantize_the_rest_around_imported_codes(method):
    model, quantized = imported_model()
    ctx = PassContext(dict(model.weights), calibration=np.random.default_rng(2).integers(0, 40, (4, 16)))
    ctx.imported = {name: (qw, "test") for name, qw in quantized.items()}
    module = AssignPrecision(QuantScheme(4, 32, True, method), keep_default=False,
                             imported=tuple((n, qw.scheme.name) for n, qw in quantized.items())).run(model.module, ctx)
    norms_before = {n: np.array(ctx.weights[n]) for n in ctx.weights if "layernorm" in n}
    QuantizeWeights().run(module, ctx)
    for name, qw in quantized.items():  # the imported codes are untouched and their float stand-ins are gone
        assert np.array_equal(dequantized_weight(ctx, name), dequantize(qw)) and name not in ctx.weights
    assert ctx.quantized["layers.1.mlp.down_proj.weight"].scheme.method == method
    if method == "awq":  # q_proj (layer 0) and up_proj (layer 1) are imported: no 1/s may be folded past them
        assert np.array_equal(ctx.weights["layers.0.input_layernorm.weight"],
                              norms_before["layers.0.input_layernorm.weight"])
        assert np.array_equal(ctx.weights["layers.1.post_attention_layernorm.weight"],
                              norms_before["layers.1.post_attention_layernorm.weight"])


def test_quantizers_do_not_claim_the_imported_forms():
    with pytest.raises(BitsmithError, match="min form and s256"):
        override_scheme("int4-g32-min", QuantScheme(4, 32, True, "rtn"))
    with pytest.raises(BitsmithError, match="min form and s256"):
        override_scheme("int4-g32-min-s256-gptq", QuantScheme(4, 32, True, "rtn"))
