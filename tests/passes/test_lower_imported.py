"""Imported weight forms (GGUF min form, K-quant two-level scales, act-order) through lowering and the compiled
kernels: qlinear's numpy reference against the float model, the kernels each node gets, int8 activations kept
off for forms without such kernels, and the compiled artifact against the reference executor."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.scalar_slice import GatherSpec
from bitsmith.compiler.reference import run_function
from bitsmith.pipeline import CompileOptions, QuantOptions, TargetOptions, run_pipeline
from test_imported_weights import FORMS, MEMORY, imported_model

PROMPT = [3, 1, 4, 1, 5, 9, 2]


def _inputs(rows: int = len(PROMPT)) -> dict:
    return {"tokens": np.array(PROMPT[:rows]), "positions": np.arange(rows),
            "kv_cache": np.zeros((2, 2, 8, 2, 8), np.float32)}


def test_reference_qlinear_of_every_form_is_the_float_model():
    """min form, two-level scales and act-order in qlinear's numpy reference: the same logits as the float
    model over the frontend's dequantized weights (which the data model's `dequantize` gave)."""
    model, _ = imported_model()
    module, ctx = run_pipeline(model, CompileOptions(dtype="float32", memory=MEMORY, target=TargetOptions("none")))
    assert sum(n.op == "qlinear" for n in module["prefill"].nodes) == len(FORMS)
    float_module, _ = run_pipeline(model, CompileOptions(dtype="float32", memory=MEMORY, target=TargetOptions("none"),
                                                         quant=QuantOptions(requantize=True)))
    got = run_function(module["prefill"], ctx.weights, _inputs())[0]
    want = run_function(float_module["prefill"], model.weights, _inputs())[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_lowering_picks_the_form_kernels_and_keeps_int8_activations_off_for_them():
    from bitsmith.codegen.target import host_target

    model, _ = imported_model()
    activations = "int8" if host_target().supports_int8_activations else "float32"
    module, ctx = run_pipeline(model, CompileOptions(dtype="float32", memory=MEMORY,
                                                     target=TargetOptions(activations=activations)))
    specs = ctx.lowered.specs.values()
    decode = [s for s in specs if isinstance(s, GemvSpec) and s.batch == 1]
    assert any(s.offset and not s.super_group and s.bits == 4 for s in decode)  # Q4_1
    assert any(s.super_group == 256 and s.bits == 6 and s.group_size == 16 for s in decode)  # Q6_K
    assert any(isinstance(s, GemmSpec) and s.super_group for s in specs)  # prefill chunks
    assert {s.cols for s in specs if isinstance(s, GatherSpec)} == {32}  # v_proj's act-order gather
    calls = ctx.lowered.schedules["rows1"].calls
    gather = next(i for i, c in enumerate(calls) if c.kernel.startswith("gather_cols"))
    assert calls[gather + 1].args[0] == calls[gather].args[-1]  # the matmul reads the gathered columns
    if activations == "int8":  # Q4_0 takes an int8-activation kernel; Q4_1 and Q6_K are said to keep float32
        assert set(ctx.lowered.float_activations) == {"layers.0.mlp.gate_proj.qweight", "layers.1.mlp.up_proj.qweight"}
        assert "min form" in ctx.lowered.float_activations["layers.0.mlp.gate_proj.qweight"]
        assert any(k.startswith(("qgemv_i8a", "qgemv_x16")) for k in ctx.lowered.specs)


@pytest.mark.slow
def test_compiled_kernels_match_the_reference_executor(tmp_path):
    """Every imported form's GEMV/GEMM and the gather, built for this CPU and run by the compiled executor:
    the same logits as the reference executor within 1e-4 of their scale."""
    from bitsmith.pipeline import build_kernels, kernel_target, memory_plan
    from bitsmith.compiler.artifact import write_artifact
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.runtime.session import CompiledSession
    from bitsmith.tools.run import reference_session

    model, _ = imported_model()
    options = CompileOptions(dtype="float32", memory=MEMORY)
    module, ctx = run_pipeline(model, options)
    kernels, files = build_kernels(ctx, kernel_target(options), tmp_path / "k", None)
    path = write_artifact(tmp_path / "art", module, ctx.weights, model.tokenizer, model.config, options.to_json(),
                          model.source, kernels=kernels, extra_files=files, memory_plan=memory_plan(ctx, kernels))
    art = load_artifact(path)
    compiled, ref = CompiledSession(art), reference_session(art)
    got, want = compiled.prefill(PROMPT), ref.prefill(PROMPT)
    np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
    for token in (7, 2):
        got, want = compiled.decode(token), ref.decode(token)
        np.testing.assert_allclose(got, want, atol=1e-4 * np.abs(want).max())
