"""Quantization passes end to end: plan policy, qlinear equals the dequantized float model, artifact sizes."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_samples, read_calibration_text
from bitsmith.compiler.reference import run_function
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import AssignPrecision, linear_weights
from bitsmith.passes.base import PassContext
from bitsmith.passes.pack_weights import PackWeights
from bitsmith.runtime.quant_scheme import QuantScheme, theoretical_bytes
from bitsmith.passes.quantize_weights import QuantizeWeights, dequantized_weight
from conftest import RANDOM_CONFIGS, random_model

INT4 = QuantScheme(4, 32, True, "rtn")


def plan_of(config_name: str, **kwargs):
    module, _ = random_model(RANDOM_CONFIGS[config_name])
    return AssignPrecision(INT4, **kwargs).plan(module)


def test_default_policy_keeps_first_and_last_layer():
    plan = plan_of("qwen3-interleaved")  # 3 layers, tied embeddings (no lm_head matrix to quantize)
    assert {n for n, s in plan.items() if s} == {n for n in plan if n.startswith("layers.1.")}
    assert "embed_tokens.weight" not in plan
    plan = plan_of("gqa", keep_default=False)
    assert all(plan.values()) and "lm_head.weight" in plan


def test_keep_and_override_patterns():
    plan = plan_of("gqa", keep_default=False, keep=("layers.0.*",), overrides=(("down_proj", "int8"),
                                                                              ("layers.1.self_attn.q_proj", "int3-asym")))
    assert plan["layers.0.mlp.down_proj.weight"] is None
    assert plan["layers.1.mlp.down_proj.weight"] == QuantScheme(8, 32, True, "rtn")  # group/sym/method inherited
    assert plan["layers.1.self_attn.q_proj.weight"] == QuantScheme(3, 32, False, "rtn")
    with pytest.raises(BitsmithError, match=r"pattern 'layers.9.\*' matches no quantizable weight"):
        plan_of("gqa", keep=("layers.9.*",))
    with pytest.raises(BitsmithError, match=r"unsupported bit width 7"):
        plan_of("gqa", overrides=(("down_proj", "int7"),))


def with_dequantized(ctx: PassContext) -> dict[str, np.ndarray]:
    """The float weights a quantized context stands for: its float ones plus each quantized one dequantized."""
    return {**dict(ctx.weights), **{name: dequantized_weight(ctx, name) for name in ctx.quantized}}


def _quantize(config_name: str, scheme: QuantScheme, calibration: np.ndarray | None = None):
    module, weights = random_model(RANDOM_CONFIGS[config_name])
    ctx = PassContext(dict(weights), calibration=calibration)
    module = AssignPrecision(scheme, keep_default=False).run(module, ctx)
    module = QuantizeWeights().run(module, ctx)
    dequantized = with_dequantized(ctx)
    packed = PackWeights().run(module, ctx)
    verify_module(packed)
    return module, dequantized, packed, ctx


@pytest.mark.parametrize("scheme", [INT4, QuantScheme(3, 64, False, "rtn"), QuantScheme(8, -1, True, "rtn"),
                                    QuantScheme(2, 32, False, "rtn")])
def test_qlinear_model_equals_dequantized_float_model(scheme):
    module, dequantized, packed, ctx = _quantize("gqa", scheme)
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6])
    inputs = lambda: {"tokens": tokens, "positions": np.arange(8), "kv_cache": np.zeros((2, 2, 8, 2, 8), np.float32)}
    ours = run_function(packed["prefill"], ctx.weights, inputs())[0]
    expected = run_function(module["prefill"], dequantized, inputs())[0]
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)
    for name in linear_weights(module):
        stem = name.removesuffix(".weight")
        stored = sum(ctx.weights[f"{stem}.{p}"].nbytes for p in ("qweight", "scales", "zeros")
                     if f"{stem}.{p}" in ctx.weights)
        out, n_in = module.weights[name].shape
        # within 2% of the theory where rows fill whole lane units; otherwise at most 12 bytes of padding per row
        slack = 0.02 * theoretical_bytes(out, n_in, scheme) if n_in % 32 == 0 else 12 * out
        assert stored <= theoretical_bytes(out, n_in, scheme) + slack


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_methods_run_layer_by_layer(method):
    samples = np.random.default_rng(0).integers(0, 40, size=(4, 16))
    module, dequantized, packed, ctx = _quantize("qwen3-interleaved", QuantScheme(4, 32, True, method), samples)
    assert set(ctx.quantized) == set(linear_weights(module))
    x = {"tokens": samples[0], "positions": np.arange(16), "kv_cache": np.zeros((3, 2, 16, 1, 8), np.float32)}
    logits = run_function(packed["prefill"], ctx.weights, x)[0]
    assert np.isfinite(logits).all()


def test_awq_folds_scales_so_the_float_function_is_preserved():
    """With AWQ the dense model after folding 1/s (before rounding) computes the same function."""
    samples = np.random.default_rng(1).integers(0, 40, size=(4, 16))
    module, weights = random_model(RANDOM_CONFIGS["gqa"])
    ctx = PassContext(dict(weights), calibration=samples)
    module = AssignPrecision(QuantScheme(8, 32, True, "awq"), keep_default=False).run(module, ctx)
    QuantizeWeights().run(module, ctx)
    x = lambda: {"tokens": samples[0], "positions": np.arange(16), "kv_cache": np.zeros((2, 2, 16, 2, 8), np.float32)}
    float_out = run_function(module["prefill"], weights, x())[0]
    quant_out = run_function(module["prefill"], with_dequantized(ctx), x())[0]  # folded norms + dequantized
    assert np.abs(quant_out - float_out).max() < 0.05 * np.abs(float_out).max()


def test_gptq_without_calibration_is_refused():
    with pytest.raises(BitsmithError, match="need calibration tokens"):
        _quantize("gqa", QuantScheme(4, 32, True, "gptq"))


def test_calibration_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(BitsmithError, match="calibration file is empty"):
        read_calibration_text(str(empty))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text('{"text": "hello there"}\n{"text": "general kenobi"}\n')
    assert read_calibration_text(str(jsonl)) == "hello there\n\ngeneral kenobi"
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(BitsmithError, match="line 1 has no string 'text'"):
        read_calibration_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(BitsmithError, match="fewer than one sample of 64"):
        calibration_samples(list(range(10)), CalibrationOptions(samples=2, seqlen=64), bos=1)
    samples = calibration_samples(list(range(100)), CalibrationOptions(samples=3, seqlen=8), bos=1)
    assert samples.shape == (3, 8) and (samples[:, 0] == 1).all()
    assert len(read_calibration_text(None)) > 4000


def test_densify_matches_qlinear():
    from bitsmith.tools.evaluate import densify

    _, _, packed, ctx = _quantize("gqa", QuantScheme(3, 32, False, "rtn"))
    dense_module, dense_weights = densify(packed, ctx.weights)
    verify_module(dense_module)
    assert "qlinear" not in {n.op for n in dense_module["prefill"].nodes}
    x = lambda: {"tokens": np.arange(6), "positions": np.arange(6), "kv_cache": np.zeros((2, 2, 6, 2, 8), np.float32)}
    np.testing.assert_array_equal(run_function(dense_module["prefill"], dense_weights, x())[0],
                                  run_function(packed["prefill"], ctx.weights, x())[0])
