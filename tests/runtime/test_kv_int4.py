"""An int4 KV cache end to end on the tiny Llama: the plan, the pools, and kernels/engine against the reference."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.generate import generate
from bitsmith.runtime.kv_cache import BlockPool, KVCacheManager
from bitsmith.runtime.memory import serving_memory
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.session import CompiledSession
from bitsmith.tools.run import reference_session

PROMPTS = [[5, 17, 3], [9] * 21, list(range(40, 75)), [7, 7]]
INT4 = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False),
                      memory=MemoryOptions(context=96, concurrency=2, kv_dtype="int4"))


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return load_artifact(tiny_artifact(INT4))


def _alone(runner, prompt, n):
    engine = Engine(runner)
    seq = engine.add(Request(prompt, n))
    engine.run_until_done()
    return seq.generated


def test_the_plan_and_the_pools_are_int4(artifact):
    """Two layers (both first/last: no float16 edges below three layers); uint8 pools of head_dim / 2 bytes
    with (step, min) scales, and the memory prediction counts exactly what the executor allocates."""
    plan = artifact.manifest["ir"]["meta"]["kv_plan"]
    assert plan["layer_dtypes"] == ["int4", "int4"] and plan["head_dim"] == 16
    runner = CompiledSession(artifact).runner
    blocks, bs, kvh = plan["num_blocks"], plan["block_size"], plan["kv_heads"]
    assert all(p.dtype == np.uint8 and p.shape == (blocks, 2, bs, kvh, 8) for p in runner.pools)
    assert all(s.dtype == np.float32 and s.shape == (blocks, 2, bs, kvh, 2) for s in runner.scales)
    pools = sum(p.nbytes for p in runner.pools) + sum(s.nbytes for s in runner.scales)
    assert serving_memory(artifact)["kv_cache"] == pools == plan["bytes"]


def test_greedy_tokens_match_the_reference_executor_with_int4_kv(artifact):
    """The kernels quantize and dequantize as kv_storage_round does: the same greedy tokens, close logits."""
    for prompt in PROMPTS[1:3]:
        n = 24
        want = list(generate(reference_session(artifact, len(prompt) + n + 1), prompt, n, SamplingParams()))
        got = list(generate(CompiledSession(artifact, len(prompt) + n + 1), prompt, n, SamplingParams()))
        assert got == want
    ref, compiled = reference_session(artifact, 96), CompiledSession(artifact)
    expect, logits = ref.prefill(PROMPTS[2])[-1], compiled.prefill(PROMPTS[2])[-1]
    np.testing.assert_allclose(logits, expect, rtol=1e-4, atol=1e-4 * np.abs(expect).max())


def test_prefill_equals_prefill_of_one_less_then_decode(artifact):
    session = CompiledSession(artifact)
    prompt = PROMPTS[2]
    full = session.prefill(prompt)[-1]
    session.reset()
    session.prefill(prompt[:-1])
    stepped = session.decode(prompt[-1])
    np.testing.assert_allclose(stepped, full, rtol=1e-5, atol=1e-5 * np.abs(full).max())


def test_engine_batching_prefix_hits_and_preemption_change_nothing(artifact):
    runner = KernelRunner(artifact)
    alone = [_alone(runner, p, 10) for p in PROMPTS]
    engine = Engine(runner)
    seqs = [engine.add(Request(p, 10)) for p in PROMPTS]
    engine.run_until_done()
    assert [s.generated for s in seqs] == alone
    assert engine.pool.available() == engine.pool.num_blocks
    prompt = PROMPTS[2][:33] + [3, 4]
    hit = engine.add(Request(prompt, 6))  # two cached int4 blocks of 16 reused
    before = engine.pool.stats.prefix_hit_tokens
    engine.run_until_done()
    assert engine.pool.stats.prefix_hit_tokens - before == 32 and hit.generated == _alone(runner, prompt, 6)
    tiny = Engine(runner)
    tiny.pool = BlockPool(4, runner.block_size)
    tiny.kv = KVCacheManager(tiny.pool, runner.max_blocks)
    seqs = [tiny.add(Request(p, 10)) for p in PROMPTS]
    tiny.run_until_done()
    assert tiny.stats.preemptions > 0 and [s.generated for s in seqs] == alone


def test_device_runner_allocates_int4_pools_like_the_host_runner(artifact):
    import tvm

    from bitsmith.runtime.cuda_runner import DeviceKernelRunner

    host, device = KernelRunner(artifact), DeviceKernelRunner(artifact, tvm.cpu(0))
    tables = np.broadcast_to(np.arange(host.max_blocks, dtype=np.int32), (20, host.max_blocks))
    tokens, positions = np.arange(3, 23, dtype=np.int64), np.arange(20, dtype=np.int64)
    np.testing.assert_array_equal(device.run(tokens, positions, tables), host.run(tokens, positions, tables))


def test_tinystories_int4_kv_greedy_tokens_match_the_reference(shared_data, tmp_path):
    """The real model (head_dim 16, 4 kv heads): 48 greedy tokens from the kernels equal the reference executor's
    with the same int4 rounding."""
    from bitsmith.pipeline import compile_model

    path = compile_model(shared_data / "tinystories-656k", tmp_path / "ts",
                         CompileOptions(memory=MemoryOptions(context=256, kv_dtype="int4")))
    art = load_artifact(path)
    ids = art.tokenizer().encode("Once upon a time, there was a little girl")
    want = list(generate(reference_session(art, len(ids) + 49), ids, 48, SamplingParams()))
    assert list(generate(CompiledSession(art, len(ids) + 49), ids, 48, SamplingParams())) == want
    assert len(set(want)) > 10
