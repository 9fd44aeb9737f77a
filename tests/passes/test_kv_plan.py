"""KV-cache planning: block counts, dtype choice under a budget, refusals that say what fits, IR tagging."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.kv_plan import KVPlan, KVPlanOptions, parse_bytes, plan_kv_cache
from bitsmith.passes.plan_kv_cache import PlanKVCache
from conftest import RANDOM_CONFIGS, random_model

MiB = 2 ** 20


def test_parse_bytes():
    assert parse_bytes("2GB") == 2_000_000_000 and parse_bytes("512MiB") == 512 * MiB
    assert parse_bytes("80MB") == 80_000_000 and parse_bytes("1.5G") == 1_500_000_000 and parse_bytes(None) is None
    with pytest.raises(BitsmithError, match="2GB"):
        parse_bytes("lots")


def test_without_budget_every_sequence_gets_its_context():
    plan = plan_kv_cache(KVPlanOptions(None, 2048, 4), 30, 3, 64, 100 * MiB, MiB)
    assert plan.num_blocks == 4 * 128 and plan.max_blocks == 128 and set(plan.layer_dtypes) == {"float16"}
    # SmolLM2 shape: 30 layers x 2 x 3 heads x 64 x 2 bytes = 23,040 bytes per token
    assert plan.bytes == 4 * 2048 * 23040


def test_a_tight_budget_picks_int8_and_keeps_the_edges_16_bit():
    fp16 = plan_kv_cache(KVPlanOptions(None, 2048, 4), 30, 3, 64, 0, 0).bytes
    plan = plan_kv_cache(KVPlanOptions(100 * MiB + int(0.7 * fp16), 2048, 4), 30, 3, 64, 100 * MiB, 0)
    assert plan.layer_dtypes[0] == plan.layer_dtypes[-1] == "float16" and set(plan.layer_dtypes[1:-1]) == {"int8"}
    assert plan.num_blocks >= 4 * 128 and plan.bytes <= int(0.7 * fp16)


def test_spare_budget_becomes_prefix_cache_headroom_up_to_4x():
    plan = plan_kv_cache(KVPlanOptions(10_000 * MiB, 256, 2), 2, 2, 16, MiB, MiB)
    assert plan.num_blocks == 4 * 2 * 16


def test_impossible_budget_says_what_would_fit():
    with pytest.raises(BitsmithError) as info:
        plan_kv_cache(KVPlanOptions(110 * MiB, 8192, 16), 30, 3, 64, 100 * MiB, 2 * MiB)
    text = str(info.value)
    assert "does not fit" in text and "--context" in text and "--memory" in text
    with pytest.raises(BitsmithError, match="--concurrency 3 with int8 KV"):
        plan_kv_cache(KVPlanOptions(200 * MiB, 2048, 64), 30, 3, 64, 100 * MiB, 2 * MiB)
    with pytest.raises(BitsmithError, match="weight bits"):
        plan_kv_cache(KVPlanOptions(50 * MiB, 2048, 1), 30, 3, 64, 100 * MiB, 0)


def test_pass_tags_attention_and_the_reference_stores_rounded_kv():
    config = RANDOM_CONFIGS["gqa"]
    module, weights = random_model(config)
    logits = {}
    for kind in ("float32", "float16", "int8", "int4"):
        ctx = PassContext(dict(weights))
        planned = PlanKVCache(KVPlanOptions(None, 64, 1, kind)).run(module, ctx)
        kinds = {n.attrs["kv_dtype"] for fn in planned.functions.values() for n in fn.nodes if n.op == "attention"}
        assert kinds == {kind}  # 2 layers: int8 keeps edges 16-bit only from 3 layers on
        assert planned.meta["kv_plan"]["num_blocks"] == 4
        session = ReferenceSession(planned, weights, 64)
        logits[kind] = np.concatenate([session.prefill([3, 9, 27, 1, 5, 8]), session.decode(11)[None]])
    untagged = ReferenceSession(module, weights, 64).prefill([3, 9, 27, 1, 5, 8])
    assert np.array_equal(logits["float32"][:6], untagged)
    err16 = np.abs(logits["float16"] - logits["float32"]).max()
    err8 = np.abs(logits["int8"] - logits["float32"]).max()
    err4 = np.abs(logits["int4"] - logits["float32"]).max()
    assert 0 < err16 < 1e-2 and err16 < err8 < err4 < 0.5 * np.abs(logits["float32"]).max()


def test_windowed_layers_get_rings_bounded_by_the_window():
    """Gemma 2 shape (alternating window 4096 / global) at 8192 tokens: a windowed layer holds window + one
    64-row chunk per sequence, in blocks ((4096 + 62) // 16 + 2 = 261), not the context (512 blocks)."""
    windows = (4096, 0) * 4
    plan = plan_kv_cache(KVPlanOptions(None, 8192, 4), 8, 4, 256, 0, 0, windows)
    per_block = 2 * 4 * 256 * 2 * 16  # k and v, 4 kv heads x 256 dims, float16, 16 tokens
    assert plan.ring_blocks == 261 and plan.ring_slots == 4 and plan.num_blocks == 4 * 512
    assert [plan.layer_blocks(i) for i in range(2)] == [4 * 261, 4 * 512]
    assert plan.layer_bytes(0) == 4 * 261 * per_block and plan.layer_bytes(1) == 4 * 512 * per_block
    assert plan.bytes == 4 * (4 * 261 + 4 * 512) * per_block < 0.8 * plan_kv_cache(KVPlanOptions(None, 8192, 4), 8, 4,
                                                                                      256, 0, 0).bytes
    again = KVPlan.from_json(plan.to_json())
    assert again == plan and plan.to_json()["layer_bytes"][:2] == [plan.layer_bytes(0), plan.layer_bytes(1)]
    legacy = {k: v for k, v in plan.to_json().items() if k not in ("layer_windows", "ring_blocks", "ring_slots")}
    assert KVPlan.from_json(legacy).bytes == 8 * 4 * 512 * per_block  # older manifests: no rings


def test_no_ring_when_window_and_chunk_span_the_context():
    plan = plan_kv_cache(KVPlanOptions(None, 1024, 2), 2, 2, 16, 0, 0, (4096, 0))
    assert plan.ring_blocks == 0 and plan.layer_blocks(0) == plan.num_blocks == 2 * 64


def test_a_budget_counts_the_rings_and_gives_the_rest_to_global_layers():
    windows = (512, 0)
    free = plan_kv_cache(KVPlanOptions(None, 4096, 2, "float16"), 2, 2, 64, 0, 0, windows)
    rings = free.layer_bytes(0)
    budget = 10 * MiB + rings + free.layer_bytes(1)  # exactly the rings + every sequence's global blocks
    plan = plan_kv_cache(KVPlanOptions(budget, 4096, 2, "float16"), 2, 2, 64, 10 * MiB, 0, windows)
    assert plan.layer_bytes(0) == rings and plan.num_blocks == 2 * 256 and plan.bytes <= budget - 10 * MiB
    # every layer windowed (Mistral): the rings are the whole cache; the block tables cost nothing
    mistral = plan_kv_cache(KVPlanOptions(10 * MiB + 2 * rings, 4096, 2, "float16"), 2, 2, 64, 10 * MiB, 0,
                            (512, 512))
    assert mistral.bytes == 2 * rings and mistral.num_blocks >= 2 * 256


def test_steps_longer_than_the_ring_allows_are_refused():
    from bitsmith.passes.lower_to_kernels import LowerToKernels

    plan = plan_kv_cache(KVPlanOptions(None, 1024, 1, "float32", chunk_rows=16), 2, 2, 16, 0, 0, (8, 0))
    assert plan.ring_blocks == (8 + 16 - 2) // 16 + 2 == 3

    class Module:
        meta = {"kv_plan": plan.to_json()}

    with pytest.raises(BitsmithError, match="overrun the windowed layers' ring.*chunk_rows=64"):
        LowerToKernels().run(Module(), PassContext({}))


def test_a_budget_too_tight_for_int8_picks_int4_with_16_bit_edges():
    """SmolLM2 shape: int8 needs 28 x 2 x 3 x (64 + 4) bytes a token for its middle layers, int4 28 x 2 x 3 x
    (32 + 8); a budget between the two whole caches falls through float16 and int8 to int4."""
    def cache(kind):
        return plan_kv_cache(KVPlanOptions(None, 2048, 4, kind), 30, 3, 64, 0, 0).bytes
    budget = 100 * MiB + (cache("int8") + cache("int4")) // 2
    plan = plan_kv_cache(KVPlanOptions(budget, 2048, 4), 30, 3, 64, 100 * MiB, 0)
    assert plan.layer_dtypes[0] == plan.layer_dtypes[-1] == "float16" and set(plan.layer_dtypes[1:-1]) == {"int4"}
    assert plan.num_blocks >= 4 * 128 and plan.bytes <= budget - 100 * MiB
    per_token = 28 * 2 * 3 * (32 + 8) + 2 * 2 * 3 * 64 * 2
    assert cache("int4") == 4 * 2048 * per_token and plan.to_json()["layer_bytes"][1] == plan.num_blocks * 16 * 2 * 3 * 40
    explicit = plan_kv_cache(KVPlanOptions(None, 64, 1, "int4"), 2, 2, 16, 0, 0)
    assert explicit.layer_dtypes == ("int4", "int4")  # two layers: no edges kept (as int8)


def test_int4_refusals_name_what_fits():
    with pytest.raises(BitsmithError, match="head_dim 15 is odd.*--kv-dtype int8"):
        plan_kv_cache(KVPlanOptions(None, 64, 1, "int4"), 4, 2, 15, 0, 0)
    with pytest.raises(BitsmithError) as odd:  # auto never offers int4 for an odd head_dim
        plan_kv_cache(KVPlanOptions(MiB + 1000, 64, 1), 4, 2, 15, MiB, 0)
    assert "int8 KV" in str(odd.value) and "int4" not in str(odd.value)
    with pytest.raises(BitsmithError) as info:
        plan_kv_cache(KVPlanOptions(200 * MiB, 2048, 64), 30, 3, 64, 100 * MiB, 2 * MiB)
    text = str(info.value)
    assert "--concurrency 3 with int8 KV" in text and "with int4 KV" in text and "MiB with int4 KV)" in text
