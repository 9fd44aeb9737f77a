"""The pass manager: a list in the wrong order is refused before anything runs; --dump-ir shows every pass's effect."""

from __future__ import annotations

import json

import pytest

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import AssignPrecision
from bitsmith.passes.base import PassContext
from bitsmith.passes.cast_weights import CastWeights
from bitsmith.passes.fuse_silu import FuseSilu
from bitsmith.passes.kv_plan import KVPlanOptions
from bitsmith.passes.lower_to_kernels import LowerToKernels
from bitsmith.passes.derive_decode import DeriveDecode
from bitsmith.passes.manager import check_order, module_facts, run_passes
from bitsmith.passes.pack_weights import PackWeights
from bitsmith.passes.plan_kv_cache import PlanKVCache
from bitsmith.runtime.quant_scheme import QuantScheme
from bitsmith.passes.quantize_weights import QuantizeWeights
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, run_pipeline
from conftest import RANDOM_CONFIGS, random_model

INT4 = QuantScheme(4, 32, True, "rtn")


def test_a_pass_before_what_it_requires_is_refused_before_anything_runs(tmp_path):
    module, weights = random_model(RANDOM_CONFIGS["gqa"])
    ctx = PassContext(dict(weights))
    passes = [AssignPrecision(INT4), CastWeights("float16"), PackWeights(), QuantizeWeights()]
    with pytest.raises(BitsmithError) as info:
        run_passes(module, ctx, passes, dump_dir=tmp_path / "ir")
    text = str(info.value)
    assert "pack_weights requires the fact 'quantized', which quantize_weights provides" in text
    assert "run quantize_weights before pack_weights" in text
    assert all(ctx.weights[k] is weights[k] for k in weights) and not (tmp_path / "ir").exists()  # nothing ran


def test_missing_providers_and_traced_only_passes_are_named():
    module, _ = random_model(RANDOM_CONFIGS["gqa"])
    assert module_facts(module) == {"canonical"}
    with pytest.raises(BitsmithError, match=r"lower_to_kernels requires the fact 'kv_planned', which plan_kv_cache "
                                            r"provides.*add plan_kv_cache before lower_to_kernels"):
        check_order([CastWeights("float32"), LowerToKernels()], module_facts(module))
    with pytest.raises(BitsmithError, match=r"plan_kv_cache requires the fact 'cast', which cast_weights provides"):
        check_order([PlanKVCache(KVPlanOptions(None, 64, 1))], module_facts(module))
    # the fusions rewrite a traced prefill; a hand-built module is canonical already
    with pytest.raises(BitsmithError, match=r"fuse_silu requires the fact 'traced'"):
        check_order([FuseSilu()], module_facts(module))
    prefill_only = module.replace(functions={"prefill": module["prefill"]})
    assert module_facts(prefill_only) == {"traced"}
    check_order([FuseSilu()], module_facts(prefill_only))
    # quantized weights must be packed before the KV plan counts the bytes as stored
    with pytest.raises(BitsmithError, match=r"plan_kv_cache requires the fact 'packed', which pack_weights provides"):
        check_order([CastWeights("float32"), PlanKVCache(KVPlanOptions(None, 64, 1))], {"canonical", "quantized"})
    check_order([CastWeights("float32"), PlanKVCache(KVPlanOptions(None, 64, 1))], {"canonical"})
    # derive_decode ends the traced form: a fusion after it is refused
    with pytest.raises(BitsmithError, match=r"fuse_silu requires the fact 'traced'.*holding: canonical\)"):
        check_order([DeriveDecode(), FuseSilu()], module_facts(prefill_only))


def test_dump_ir_writes_side_tables_for_what_each_pass_did(tmp_path):
    module, weights = random_model(RANDOM_CONFIGS["gqa"])
    model = LoadedModel(module, weights, None, {"max_position": 128}, {}, "float32")
    options = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False),
                             memory=MemoryOptions(context=64), dump_ir=str(tmp_path / "ir"))
    run_pipeline(model, options)
    files = sorted(p.name for p in (tmp_path / "ir").iterdir())
    assert files == ["00-input.ir", "01-eliminate_dead_code.ir", "02-assign_precision.ir",
                     "02-assign_precision.precision_plan.txt", "03-quantize_weights.ir",
                     "03-quantize_weights.weights.txt", "04-cast_weights.ir", "04-cast_weights.weights.txt",
                     "05-pack_weights.ir", "06-plan_kv_cache.ir",
                     "06-plan_kv_cache.kv_plan.json", "07-lower_to_kernels.ir", "07-lower_to_kernels.schedules.txt"]
    read = lambda name: (tmp_path / "ir" / name).read_text()
    table = lambda name: {line.split()[0]: line.split()[1:] for line in read(name).splitlines() if line[0] != "#"}
    assert table("02-assign_precision.precision_plan.txt")["layers.0.mlp.down_proj.weight"] == ["int4-g32-sym-rtn"]
    down = "layers.0.mlp.down_proj"
    # quantize_weights writes the packed parts and drops the float weight (pack_weights rewrites the IR only)
    packed = table("03-quantize_weights.weights.txt")
    assert packed[f"{down}.qweight"] == ["uint32", "32x5", "int4-g32-sym-rtn"]
    assert packed[f"{down}.scales"][2] == "int4-g32-sym-rtn" and packed[f"{down}.weight"] == ["removed"]
    plan = json.loads(read("06-plan_kv_cache.kv_plan.json"))
    assert plan["kv_plan"]["max_context"] == 64 and plan["memory_estimate"]["kv_cache"] == plan["kv_plan"]["bytes"]
    schedules = read("07-lower_to_kernels.schedules.txt").splitlines()
    assert [line.split()[0] for line in schedules[2:]] == ["rows1", "rows4", "rows16", "rows32", "rows64"]
    assert schedules[2].split()[1:3] == ["decode", "1"]
    first = {name: read(name) for name in files}
    run_pipeline(model, options)  # deterministic: the same files again
    assert {name: read(name) for name in files} == first
