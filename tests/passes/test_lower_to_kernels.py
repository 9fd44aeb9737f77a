"""lower_to_kernels: schedules cover every op, buffers that live together never overlap, fusions happen."""

from __future__ import annotations

import pytest

from bitsmith.compiler.ir import TensorType
from bitsmith.errors import BitsmithError
from bitsmith.passes.kv_plan import KVPlan
from bitsmith.passes.lower_to_kernels import lower_function, plan_buffers
from bitsmith.runtime.schedule import KernelCall, Schedule
from conftest import RANDOM_CONFIGS, random_model


def _kv(config) -> KVPlan:
    return KVPlan(16, 8, 4, ("float16",) * config.num_layers, config.num_kv_heads, config.head_dim, 64, 2)


def _lifetimes(schedule: Schedule) -> dict[str, tuple[int, int]]:
    spans: dict[str, list[int]] = {}
    for index, call in enumerate(schedule.calls):
        for kind, ref, *_ in call.args:
            if kind == "buffer":
                spans.setdefault(ref, [index, index])[1] = index
    for name in (*schedule.inputs.values(), schedule.output):
        spans[name] = [-1, len(schedule.calls)]
    return {k: (v[0], v[1]) for k, v in spans.items()}


def _assert_no_live_overlap(schedule: Schedule) -> None:
    life = _lifetimes(schedule)
    names = sorted(life)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            (s1, e1), (s2, e2) = life[a], life[b]
            if s1 <= e2 and s2 <= e1:  # alive together: their bytes must be disjoint
                ba, bb = schedule.buffers[a], schedule.buffers[b]
                assert ba.offset + ba.nbytes <= bb.offset or bb.offset + bb.nbytes <= ba.offset, (a, b)
        buf = schedule.buffers[a]
        assert buf.offset % 64 == 0 and buf.offset + buf.nbytes <= schedule.arena_bytes


def test_plan_reuses_memory_and_never_overlaps_live_buffers():
    types = {n: TensorType((16, 64), "float32") for n in "abcde"}
    pairs = ("ab", "bc", "cd", "de")
    calls = [KernelCall(f"k{i}", tuple(("buffer", n, (16, 64)) for n in p)) for i, p in enumerate(pairs)]
    buffers, total = plan_buffers(calls, types, {"a", "e"})
    one = 16 * 64 * 4
    assert total == 4 * one  # a and e pinned, b..d alternate in two slots
    assert buffers["b"].offset != buffers["c"].offset and buffers["b"].offset == buffers["d"].offset


@pytest.mark.parametrize("config", sorted(RANDOM_CONFIGS))
def test_random_model_lowers_with_fusions(config):
    module, _ = random_model(RANDOM_CONFIGS[config])
    specs, constants = {}, {}
    for entry, rows in (("decode", 1), ("prefill", 16)):
        schedule = lower_function(module[entry], rows, _kv(RANDOM_CONFIGS[config]), specs, constants)
        _assert_no_live_overlap(schedule)
        kernels = [c.kernel for c in schedule.calls]
        layers = RANDOM_CONFIGS[config].num_layers
        assert sum(k.startswith("paged_attention") for k in kernels) == layers
        assert any("silu_mul" in k for k in kernels) and not any(k.startswith("unary_silu") for k in kernels)
        assert any(k.startswith("add_rmsnorm") for k in kernels)
        # the plan is smaller than giving every buffer its own bytes
        assert schedule.arena_bytes < sum(b.nbytes for b in schedule.buffers.values())
        assert Schedule.from_json(schedule.to_json()) == schedule


def test_unsupported_op_names_the_op():
    module, _ = random_model(RANDOM_CONFIGS["gqa"])
    fn = module["decode"]
    nodes = list(fn.nodes)
    index = next(i for i, n in enumerate(nodes) if n.op == "silu")
    nodes[index] = nodes[index].__class__("sigmoid", nodes[index].inputs, nodes[index].outputs, {})
    with pytest.raises(BitsmithError, match="op sigmoid"):
        lower_function(fn.replace(nodes=tuple(nodes)), 1, _kv(RANDOM_CONFIGS["gqa"]), {}, {})


def test_lowering_checks_every_kernel_against_its_target(monkeypatch):
    """Every emitted spec goes through the target's check: a CUDA lowering emits GPU families only, and a
    family the target does not build is refused by name instead of failing later in the build."""
    from bitsmith.codegen import target as codegen_target

    module, _ = random_model(RANDOM_CONFIGS["gqa"])
    kv, specs = _kv(RANDOM_CONFIGS["gqa"]), {}
    lower_function(module["decode"], 1, kv, specs, {}, target="cuda")
    assert specs and {type(s).__name__ for s in specs.values()} <= set(codegen_target.GPU_FAMILIES)
    without = tuple(f for f in codegen_target.GPU_FAMILIES if f != "PagedAttentionSpec")
    monkeypatch.setattr(codegen_target, "GPU_FAMILIES", without)
    with pytest.raises(BitsmithError, match="PagedAttentionSpec kernel for target cuda_sm_90a"):
        lower_function(module["decode"], 1, kv, {}, {}, target="cuda")
