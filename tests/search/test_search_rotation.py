"""The search with rotation and HQQ: the rotate passes are the compile's, sensitivities are measured on the rotated
model, --rotate auto keeps the lower measured KLD, HQQ choices cost RTN's bytes, and compile --plan rebuilds both."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QUANTIZER_METHODS, parse_scheme
from bitsmith.search.cost import tensor_bytes
from bitsmith.search.experts import roundtrip
from bitsmith.search.rotation import rotate_model, rotation_kinds, rotation_passes
from bitsmith.search.sensitivity import CANDIDATES, candidates

needs_hqq = pytest.mark.skipif("hqq" not in QUANTIZER_METHODS, reason="--method hqq is not in this tree yet")


def test_rotation_passes_are_the_compiles_rotate_phase():
    from bitsmith.options import CompileOptions, RotationOptions
    from bitsmith.pipeline import pipeline_steps

    steps = [(step, waits) for step, waits in pipeline_steps(CompileOptions(rotation=RotationOptions("hadamard", 7)))
             if step.phase == "rotate"]
    compiled = [step.build(CompileOptions(rotation=RotationOptions("hadamard", 7)), None) if step.build else step.kind()
                for step, _ in steps]
    assert compiled == rotation_passes(7)  # same classes, same seeds, same order (frozen dataclasses compare fields)
    assert rotation_kinds("auto") == ("none", "hadamard") and rotation_kinds("none") == ("none",)
    with pytest.raises(BitsmithError, match="--rotate"):
        rotation_kinds("learned")


@needs_hqq
def test_hqq_candidates_cost_rtns_bytes_and_round_trip_by_hqq():
    schemes = candidates(("rtn", "hqq"))
    assert schemes[:len(CANDIDATES)] == CANDIDATES and schemes[len(CANDIDATES):] == tuple(f"{s}-hqq" for s in CANDIDATES)
    for s in CANDIDATES:
        assert tensor_bytes(96, 256, f"{s}-hqq") == tensor_bytes(96, 256, s)
    w = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32)
    w[:, 3] *= 8  # an outlier column: RTN's grid widens for it, HQQ trades its error against the rest
    rtn, hqq = roundtrip(w, "int3-g32"), roundtrip(w, "int3-g32-hqq")
    assert not np.allclose(rtn, hqq)
    # HQQ minimises an lp norm (p = 0.7) of the error: lower than RTN's on the same grid
    assert (np.abs(w - hqq) ** 0.7).sum() < (np.abs(w - rtn) ** 0.7).sum()
    with pytest.raises(BitsmithError, match="--methods"):
        candidates(("gptq",))


def test_plan_overrides_keep_a_schemes_method_and_read_the_rotation(tmp_path):
    from bitsmith.search.run import PLAN_FORMAT, plan_rotation, plan_to_overrides

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": PLAN_FORMAT, "method": "rtn", "rotation": {"kind": "hadamard", "seed": 3},
                                "weights": {"a": "16", "b": "int4-g32", "c": "int4-g64-hqq"}}))
    assert plan_to_overrides(path) == (("a",), (("b", "int4-g32-rtn"), ("c", "int4-g64-hqq")))
    assert plan_rotation(path) == ("hadamard", 3)
    old = tmp_path / "old.json"  # a plan from before rotation
    old.write_text(json.dumps({"format": PLAN_FORMAT, "weights": {"b": "int4-g32"}}))
    assert plan_rotation(old) == ("none", 0)


def test_compile_refuses_a_rotation_the_plan_was_not_searched_with(tmp_path):
    from bitsmith.cli import main
    from bitsmith.search.run import PLAN_FORMAT

    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"format": PLAN_FORMAT, "rotation": {"kind": "none", "seed": 0}, "weights": {}}))
    result = CliRunner().invoke(main, ["compile", "--plan", str(path), "--rotate", "hadamard", "-o", str(tmp_path / "x")])
    assert result.exit_code != 0 and "contradicts the plan" in result.output


def test_rotated_sensitivity_sees_every_tensor(shared_data, tmp_path):
    """Every tensor of the rotated model has a positive probe KLD (the online Hadamard factors once moved later
    layers into the head's segment, where their weights were frozen: 8 of 14 tensors read 0)."""
    from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_tokens
    from bitsmith.compiler.loader import load_model
    from bitsmith.compiler.reference import ReferenceSession, upcast_weights
    from bitsmith.passes.assign_precision import linear_weights
    from bitsmith.passes.canonicalize import canonical_model
    from bitsmith.search.sensitivity import measure_sensitivity

    model = canonical_model(load_model(shared_data / "tinystories-656k"))
    weights = upcast_weights(model.weights)
    samples = calibration_tokens(model, CalibrationOptions(None, 1, 32, 0))
    module, rotated = rotate_model(model.module, weights, "hadamard", 0, samples)
    tokens = list(range(1, 33))
    ref = ReferenceSession(model.module, weights, 32).prefill(tokens)
    got = ReferenceSession(module, rotated, 32).prefill(tokens)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # the rotation is exact in fp32
    tensors = [t for t in linear_weights(model.module)]
    sens = measure_sensitivity(module, rotated, samples, tensors)
    assert all(sens.probe_kld[t] > 1e-5 for t in tensors), sens.probe_kld


@pytest.mark.slow
def test_search_auto_then_compile_applies_the_rotation(shared_data, tmp_path):
    from bitsmith.cli import main
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.search.run import SearchOptions, run_search

    source = shared_data / "tinystories-656k"
    opts = SearchOptions(memory=1 << 40, bpw=4.5, context=256, keep_default=False, cache_dir=str(tmp_path / "cache"),
                         calib_samples=2, pareto_points=3, measure=2, rotate="auto")
    report = run_search(source, opts, tmp_path / "plan.json")
    choices = report["rotation_choices"]
    assert set(choices) == {"none", "hadamard"}
    best = min(choices, key=lambda k: choices[k]["kld_meas"])
    assert (report["rotation"]["kind"], report["rotation"]["seed"]) == (best, 0) and report["predicted"] == {**report["predicted"],
                                                                                      **choices[best]}
    for kind in choices:  # equal bits per searched weight; the rotated model's head_norm is extra fixed bytes
        assert choices[kind]["bpw"] <= 4.5 + 1e-9
    hadamard = run_search(source, SearchOptions(**{**opts.__dict__, "rotate": "hadamard"}), tmp_path / "rot.json")
    assert hadamard["rotation"]["kind"] == "hadamard" and hadamard["weights"]["head_norm.weight"] == "16"
    assert "lm_head.weight" not in hadamard["weights"]  # the tied head stays tied
    recorded = json.loads((tmp_path / "rot.json").read_text())["rotation"]
    assert (recorded["kind"], recorded["seed"]) == ("hadamard", 0)
    result = CliRunner().invoke(main, ["compile", str(source), "--plan", str(tmp_path / "rot.json"), "--target", "none",
                                       "--gate", "none", "-o", str(tmp_path / "art")])
    assert result.exit_code == 0, result.output
    meta = load_artifact(tmp_path / "art").manifest["ir"]["meta"]
    assert {"r1", "r2", "ffn", "keys"} <= set(meta["rotation"])
    # the compile found the outlier channels the search rotated around (same calibration tokens)
    assert (meta["rotation"].get("outliers", {}).get("channels") or None) == recorded.get("outliers"), meta["rotation"]
    for name, scheme in hadamard["weights"].items():
        got = meta["precision_plan"].get(name)
        if scheme == "16":
            assert got is None, name
        else:
            want = parse_scheme(scheme)
            assert (got["bits"], got["group_size"], got["method"]) == (want.bits, want.group_size, want.method), name


def test_auto_keeps_the_rotation_that_fits_the_budget(shared_data, tmp_path, monkeypatch):
    """--rotate auto: a rotation that cannot meet the budget (a tied model's untied lm_head) is reported and the other
    plan kept; --rotate hadamard alone raises it."""
    import bitsmith.search.run as run

    def fake_search(model, kind, opts, *args, **kwargs):
        if kind == "hadamard":
            raise BitsmithError("the budget cannot hold the rotated model", where="search")
        point = {"bytes": 1000, "bpw": 4.0, "kld_pred": 0.1, "kld_meas": 0.2, "latency_pred_ms": 1.0}
        return {"format": run.PLAN_FORMAT, "rotation": {"kind": kind, "seed": 0}, "weights": {}, "spearman": None,
                "pareto": [{**point, "plan": {}}], "predicted": point}

    monkeypatch.setattr(run, "search_rotation", fake_search)
    opts = run.SearchOptions(memory=1, calib_samples=1, calib_seqlen=16, rotate="auto")
    report = run.run_search(shared_data / "tinystories-656k", opts, tmp_path / "plan.json")
    assert report["rotation"]["kind"] == "none" and "cannot hold" in report["rotation_choices"]["hadamard"]["refused"]
    assert "--rotate hadamard: search: the budget cannot hold" in run.format_pareto(report)
    with pytest.raises(BitsmithError, match="cannot hold the rotated"):
        run.run_search(shared_data / "tinystories-656k", run.SearchOptions(**{**opts.__dict__, "rotate": "hadamard"}),
                       tmp_path / "plan2.json")
