"""search_mse_clip (the weight's own rounding error, no data) and --clip mse in RTN/GPTQ and the CLI."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.options import QuantOptions
from bitsmith.passes.quant.gptq import accumulate_hessian, quantize_gptq
from bitsmith.passes.quant.hqq import quantize_calibration_free
from bitsmith.passes.quant.rtn import MSE_CLIP_NORM, MSE_CLIP_RATIOS, quantize_rtn, search_mse_clip
from bitsmith.runtime.quant_scheme import QuantScheme, dequantize, group_index

SCHEMES = [QuantScheme(b, g, sym, "rtn") for b in (4, 3, 2) for g in (32, -1) for sym in (True, False)]


def _group_error(w: np.ndarray, w_hat: np.ndarray, scheme: QuantScheme) -> np.ndarray:
    """sum |w - w_hat|^MSE_CLIP_NORM per group [out, n_groups], the quantity the search minimises."""
    gidx = group_index(w.shape[1], scheme)
    err = np.abs(w - w_hat).astype(np.float64) ** MSE_CLIP_NORM
    return np.stack([err[:, gidx == g].sum(axis=1) for g in range(scheme.n_groups(w.shape[1]))], axis=1)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_no_group_ends_worse_than_its_full_range_and_gaussian_rows_gain(scheme):
    w = (np.random.default_rng(0).standard_normal((40, 200)) * 0.05).astype(np.float32)  # 200: a partial group
    ratio = search_mse_clip(w, scheme)
    assert ratio.shape == (40, scheme.n_groups(200)) and np.isin(ratio, np.float32(MSE_CLIP_RATIOS)).all()
    full = _group_error(w, dequantize(quantize_rtn(w, scheme)), scheme)
    clipped = _group_error(w, dequantize(quantize_rtn(w, scheme, ratio)), scheme)
    assert np.all(clipped <= full * (1 + 1e-6))
    assert clipped.sum() < 0.95 * full.sum()  # Gaussian weights: the tails are worth clipping at these widths


def test_each_group_gets_the_best_ratio_of_the_grid():
    """Brute force over the grid, one ratio for the whole weight at a time: the per-group choice is the argmin."""
    scheme = QuantScheme(4, 32, True, "rtn")
    w = np.random.default_rng(1).laplace(size=(8, 96)).astype(np.float32)
    errors = np.stack([_group_error(w, dequantize(quantize_rtn(w, scheme, r)), scheme) for r in MSE_CLIP_RATIOS])
    expected = np.asarray(MSE_CLIP_RATIOS, dtype=np.float32)[errors.argmin(axis=0)]
    got = search_mse_clip(w, scheme)
    index = np.abs(np.float32(MSE_CLIP_RATIOS)[:, None, None] - got[None]).argmin(axis=0)
    chosen = np.take_along_axis(errors, index[None], axis=0)[0]
    assert np.allclose(chosen, errors.min(axis=0), rtol=1e-9) and (got == expected).mean() > 0.95  # ties aside


def test_weights_already_on_the_grid_keep_their_range():
    scheme = QuantScheme(4, 32, True, "rtn")
    codes = np.random.default_rng(2).integers(-8, 8, size=(6, 64)).astype(np.float32)
    codes[:, ::32] = -8  # every group spans the whole code range: no clip can be exact
    w = codes * 0.125
    assert np.all(search_mse_clip(w, scheme) == 1.0)
    assert np.array_equal(dequantize(quantize_calibration_free(w, scheme, mse_clip=True)), w)


@pytest.mark.parametrize("scheme", [QuantScheme(4, -1, True, "gptq"), QuantScheme(3, 32, True, "gptq")],
                         ids=lambda s: s.name)
def test_gptq_with_mse_clip_beats_gptq_on_held_out_tokens(scheme):
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((3072, 24)) @ rng.standard_normal((24, 256)) * 0.4
         + rng.standard_normal((3072, 256))).astype(np.float32)
    w = (rng.standard_normal((128, 256)) * 0.05).astype(np.float32)
    h, _ = accumulate_hessian(None, x[:2560], 0)
    held = x[2560:]

    def error(mse_clip: bool) -> float:
        w_hat = dequantize(quantize_gptq(w, h, scheme, mse_clip=mse_clip))
        return float(np.linalg.norm(held @ (w - w_hat).T))

    assert error(True) < 0.95 * error(False)


def test_mse_clip_needs_static_group_parameters_and_a_known_mode():
    w = np.ones((4, 64), np.float32)
    with pytest.raises(BitsmithError, match="static group parameters"):
        quantize_gptq(w, np.eye(64), QuantScheme(4, 32, True, "gptq"), act_order=False, mse_clip=True)
    with pytest.raises(BitsmithError, match="unknown clip mode"):
        QuantOptions("gptq", clip="minmax")
    for method in ("awq", "hqq", None):  # they would ignore it: refused, not silently dropped
        with pytest.raises(BitsmithError, match="--clip mse applies to --method rtn or gptq"):
            QuantOptions(method, clip="mse")


def test_compile_clip_mse_is_recorded_and_lowers_each_weights_rounding_error(tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main
    from bitsmith.compiler.ir import Module
    from bitsmith.options import CompileOptions, MemoryOptions, TargetOptions
    from bitsmith.pipeline import compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.tools.evaluate import densify
    from conftest import save_tiny_hf_model

    model = tmp_path / "model"
    save_tiny_hf_model(model, "llama")
    arts = {}
    for clip in ("none", "mse"):
        options = CompileOptions(quant=QuantOptions("rtn", 4, 32, keep_default=False, clip=clip),
                                 memory=MemoryOptions(kv_dtype="float32"), target=TargetOptions("none"))
        arts[clip] = load_artifact(compile_model(model, tmp_path / clip, options))
    assert arts["mse"].manifest["compile"]["quant"]["clip"] == "mse"
    source = load_artifact(compile_model(model, tmp_path / "fp", CompileOptions(
        dtype="float32", memory=MemoryOptions(kv_dtype="float32"), target=TargetOptions("none"))))
    name = "layers.0.mlp.down_proj.weight"
    w = np.asarray(source.weights[name], dtype=np.float32)
    errors = {}
    for clip, art in arts.items():
        _, dense = densify(Module.from_json(art.manifest["ir"]), art.weights)
        errors[clip] = float(np.sum(np.abs(w - dense[next(k for k in dense if k.startswith(name.removesuffix(".weight")) and k.endswith(".dense"))]) ** MSE_CLIP_NORM))
    assert errors["mse"] < errors["none"]
    refused = CliRunner().invoke(main, ["compile", str(model), "-o", str(tmp_path / "bad"), "--clip", "max"])
    assert refused.exit_code == 2 and "--clip" in refused.output
