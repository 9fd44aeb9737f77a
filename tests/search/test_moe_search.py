"""The bit-width search on a mixture of experts: a block's experts are one search unit (gate_up and down share a
scheme), all experts are stored (bytes) but only those a step's rows chose are read (latency, from the measured
usage), and the plan compiles."""

from __future__ import annotations

from bitsmith.compiler.loader import load_model
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.search.cost import LatencyTable, tensor_bytes
from bitsmith.search.run import SearchOptions, build_search_model, plan_to_overrides, run_search
from bitsmith.search.sensitivity import Sensitivity
from family_zoo import zoo_model

UNIT = "layers.0.mlp.experts"


def test_search_sees_experts_and_its_plan_compiles(tmp_path, shared_data):
    from bitsmith.pipeline import CompileOptions, QuantOptions, TargetOptions, compile_model
    from bitsmith.tools.synthetic import write_padded_tokenizer

    model = zoo_model("mixtral", vocab_size=2048)  # 4 experts, 2 per token, hidden 64, inter 128
    model.save_pretrained(tmp_path / "hf")
    write_padded_tokenizer(shared_data / "tinystories-656k", tmp_path / "hf", 2048)
    opts = SearchOptions(memory=700_000, context=64, keep_default=False, calib_samples=2, calib_seqlen=32,
                         pareto_points=4, measure=2, cache_dir=str(tmp_path / "cache"))
    # the cost model: E x the bytes of one expert slice, top_k x its GEMV seconds
    loaded = canonical_model(load_model(tmp_path / "hf"))
    latency = LatencyTable(tmp_path / "cache")
    sm = build_search_model(loaded.module, loaded.weights, opts, Sensitivity({}, {}, 0), latency)
    assert sm.units[UNIT] == [f"{UNIT}.down_proj", f"{UNIT}.gate_up_proj"]
    choice = {c.scheme: c for c in sm.options[UNIT]}["int4-g32"]
    assert choice.bytes == 4 * (tensor_bytes(256, 64, "int4-g32") + tensor_bytes(64, 128, "int4-g32"))
    assert abs(choice.seconds - 2 * (latency.seconds(256, 64, "int4-g32", 1) + latency.seconds(64, 128, "int4-g32", 1))) < 1e-12
    # a batch of 4 reads each expert some row chose: 4 x (1 - (1 - 2/4)^4) = 3.75 expected, measured usage if given
    batch4 = SearchOptions(**{**opts.__dict__, "batch": 4})
    batched = build_search_model(loaded.module, loaded.weights, batch4, Sensitivity({}, {}, 0), latency)
    one = latency.seconds(256, 64, "int4-g32", 1) + latency.seconds(64, 128, "int4-g32", 1)
    assert abs({c.scheme: c for c in batched.options[UNIT]}["int4-g32"].seconds - 3.75 * one) < 1e-12
    skewed = {"layers.0.mlp": {"frequency": [1.0, 1.0, 0.0, 0.0]}}  # two experts take every token
    sm2 = build_search_model(loaded.module, loaded.weights, batch4, Sensitivity({}, {}, 0), latency,
                             skewed)
    assert abs({c.scheme: c for c in sm2.options[UNIT]}["int4-g32"].seconds - 2 * one) < 1e-12
    report = run_search(tmp_path / "hf", opts, tmp_path / "plan.json")
    usage = report["expert_usage"]["layers.1.mlp"]
    assert usage["tokens"] == 2 * 32 and abs(sum(usage["frequency"]) - 2) < 1e-2
    plan = report["weights"]
    for layer in (0, 1):
        assert plan[f"layers.{layer}.mlp.experts.gate_up_proj"] == plan[f"layers.{layer}.mlp.experts.down_proj"]
    assert report["predicted"]["bytes"] <= 700_000 and any(s != "16" for s in plan.values())
    keep, schemes = plan_to_overrides(tmp_path / "plan.json")
    art = compile_model(tmp_path / "hf", tmp_path / "art", CompileOptions(
        quant=QuantOptions("rtn", keep_default=False, keep=keep, schemes=schemes), target=TargetOptions("none")))
    assert art.is_dir()
