"""Bit-width search: the ILP is exact on small instances; search + compile --plan on the real test model."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import parse_scheme
from bitsmith.search.solver import Choice, minimum_bytes, solve


def _instance(seed: int, tensors: int = 5):
    rng = np.random.default_rng(seed)
    options = {}
    for t in range(tensors):
        bits = [16, 8, 4, 3, 2]
        options[f"t{t}"] = [Choice(str(b), int(b * 100 * (1 + t)), float(b * rng.uniform(1, 2)),
                                   0.0 if b == 16 else float(rng.uniform(0, 1) / b ** 2 * (1 + t))) for b in bits]
    return options


@pytest.mark.parametrize("seed", range(4))
def test_ilp_matches_brute_force(seed):
    options = _instance(seed)
    names = sorted(options)
    budget = minimum_bytes(options) * 2.5
    latency = sum(max(c.seconds for c in options[n]) for n in names) * 0.6
    best = None
    for combo in itertools.product(*(options[n] for n in names)):
        if sum(c.bytes for c in combo) <= budget and sum(c.seconds for c in combo) <= latency:
            kld = sum(c.kld for c in combo)
            best = kld if best is None or kld < best else best
    picked = solve(options, budget, latency)
    assert picked is not None and abs(sum(c.kld for c in picked.values()) - best) < 1e-9
    assert sum(c.bytes for c in picked.values()) <= budget
    assert solve(options, minimum_bytes(options) - 1, None) is None


def test_search_then_compile_the_plan(shared_data, tmp_path):
    from bitsmith.pipeline import CompileOptions, QuantOptions, TargetOptions, compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.search.run import SearchOptions, plan_to_overrides, run_search

    source = shared_data / "tinystories-656k"
    opts = SearchOptions(memory=1_250_000, context=256, keep_default=False, cache_dir=str(tmp_path / "cache"),
                         pareto_points=6, measure=4)
    report = run_search(source, opts, tmp_path / "plan.json")
    assert report["predicted"]["bytes"] <= 1_250_000
    assert (tmp_path / "plan.pareto.png").stat().st_size > 1000
    assert len(json.loads((tmp_path / "plan.pareto.json").read_text())) >= 3
    assert report["spearman"] is not None and report["spearman"] > 0.5
    again = run_search(source, opts, tmp_path / "plan2.json")  # warm: sensitivity and latencies cached
    assert again["weights"] == report["weights"]
    keep, schemes = plan_to_overrides(tmp_path / "plan.json")
    art = load_artifact(compile_model(source, tmp_path / "art", CompileOptions(
        quant=QuantOptions("rtn", keep_default=False, keep=keep, schemes=schemes), target=TargetOptions("none"))))
    plan = art.manifest["ir"]["meta"]["precision_plan"]
    for name, scheme in report["weights"].items():
        got = plan[name]
        if scheme == "16":
            assert got is None
        else:
            want = parse_scheme(scheme)
            assert (got["bits"], got["group_size"], got["method"]) == (want.bits, want.group_size, want.method)
    with pytest.raises(BitsmithError, match="smallest feasible"):
        run_search(source, SearchOptions(**{**opts.__dict__, "memory": 100_000}), tmp_path / "bad.json")
