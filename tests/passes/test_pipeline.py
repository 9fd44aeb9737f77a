"""The phased pass list: which passes the options (and the kind of model) put in it, and how it prints."""

from __future__ import annotations

import pytest

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.passes.canonicalize import CANONICALIZE
from bitsmith.passes.manager import check_order, module_facts
from bitsmith.pipeline import CompileOptions, QuantOptions, TargetOptions, default_passes, describe_pipeline
from conftest import RANDOM_CONFIGS, random_model

GPTQ_LM_HEAD = CompileOptions(quant=QuantOptions("gptq", schemes=(("lm_head", "int8"),)))
CASES = {
    "default": (CompileOptions(), ["cast_weights", "plan_kv_cache", "lower_to_kernels"]),
    "gptq lm_head=int8": (GPTQ_LM_HEAD, ["untie_lm_head", "assign_precision", "quantize_weights", "cast_weights",
                                         "pack_weights", "plan_kv_cache", "lower_to_kernels"]),
    "rtn, target none": (CompileOptions(quant=QuantOptions("rtn"), target=TargetOptions("none")),
                         ["assign_precision", "quantize_weights", "cast_weights", "pack_weights", "plan_kv_cache"]),
    # a --scheme that keeps the lm_head 16-bit quantizes (the plan is written) but unties nothing
    "lm_head=16": (CompileOptions(quant=QuantOptions(schemes=(("lm_head", "16"),))),
                   ["assign_precision", "quantize_weights", "cast_weights", "pack_weights", "plan_kv_cache",
                    "lower_to_kernels"]),
}


def _models() -> dict[str, LoadedModel]:
    module, weights = random_model(RANDOM_CONFIGS["gqa"])
    hand_built = LoadedModel(module, weights, None, {"max_position": 128}, {}, "float32")
    traced = LoadedModel(module.replace(functions={"prefill": module["prefill"]}), weights, None,
                         {"max_position": 128}, {}, "float32")
    return {"canonical": hand_built, "traced": traced}


@pytest.mark.parametrize("case", sorted(CASES))
def test_options_choose_the_passes_and_every_list_is_in_order(case):
    options, after_canonicalize = CASES[case]
    models = _models()
    canonical = [p.name for p in default_passes(options, models["canonical"])]
    assert canonical == ["eliminate_dead_code", *after_canonicalize]
    traced = [p.name for p in default_passes(options, models["traced"])]
    assert traced == [p.name for p in CANONICALIZE] + after_canonicalize
    assert traced[:11] == ["eliminate_dead_code", "fold_weight_expressions", "fuse_silu", "fuse_gelu",
                          "fuse_linear_bias", "fuse_rmsnorm", "fuse_rope", "fuse_router", "simplify_layout",
                          "derive_decode", "eliminate_dead_code"]
    for model in models.values():
        check_order(default_passes(options, model), module_facts(model.module))


def test_the_pipeline_prints_by_phase():
    assert describe_pipeline(GPTQ_LM_HEAD).splitlines() == [
        "canonicalize   traced input: eliminate_dead_code, fold_weight_expressions, fuse_silu, fuse_gelu,",
        "                 fuse_linear_bias, fuse_rmsnorm, fuse_rope, fuse_router, simplify_layout,",
        "                 derive_decode, eliminate_dead_code",
        "               canonical input: eliminate_dead_code",
        "precision      untie_lm_head, assign_precision",
        "quantize/pack  quantize_weights, cast_weights, pack_weights",
        "memory plan    plan_kv_cache",
        "lower          lower_to_kernels",
    ]
    # with the model known, its kind is resolved
    text = describe_pipeline(CompileOptions(target=TargetOptions("none")), _models()["canonical"])
    assert text.splitlines() == ["canonicalize   eliminate_dead_code", "quantize/pack  cast_weights",
                                 "memory plan    plan_kv_cache"]


def test_options_serialise_nested_by_concern():
    data = GPTQ_LM_HEAD.to_json()
    assert set(data) == {"dtype", "tokenizer", "verify", "dump_ir", "quant", "memory", "target", "gate", "rotation"}
    assert data["rotation"]["kind"] == "none"  # rotations are asked for
    assert data["quant"]["method"] == "gptq" and data["quant"]["schemes"] == (("lm_head", "int8"),)
    assert data["memory"]["kv_dtype"] == "auto" and data["target"] == {"name": "host", "arch": None,
                                                                         "activations": "float32", "cpu": None,
                                                                         "features": ()}
    assert data["gate"]["spec"] is None  # the library compiles ungated; only the CLI defaults to a gate
