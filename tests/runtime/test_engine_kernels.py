"""The engine on real compiled kernels: batching, prefix caching and preemption change nothing in the output."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.kv_cache import BlockPool, KVCacheManager

PROMPTS = [[5, 17, 3], [9] * 21, [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7], list(range(60, 93))]


@pytest.fixture(scope="module")
def runner(tiny_artifact):
    path = tiny_artifact(CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32),
                                        memory=MemoryOptions(context=64, concurrency=2)))
    return KernelRunner(load_artifact(path))


def _alone(runner, prompt, n):
    engine = Engine(runner)
    seq = engine.add(Request(prompt, n))
    engine.run_until_done()
    return seq.generated


def test_batched_greedy_equals_each_alone_and_blocks_come_back(runner):
    engine = Engine(runner)
    seqs = [engine.add(Request(p, 12)) for p in PROMPTS]
    engine.run_until_done()
    assert [s.generated for s in seqs] == [_alone(runner, p, 12) for p in PROMPTS]
    assert engine.pool.available() == engine.pool.num_blocks and not engine.pool.refcount.any()


def test_prefix_hit_equals_miss_and_skips_the_shared_prefill(runner):
    system = list(range(10, 42))  # two full blocks of 16
    cold = _alone(runner, system + [3, 4], 8)
    engine = Engine(runner)
    engine.add(Request(system + [5], 4))
    engine.run_until_done()
    before = engine.stats.rows
    seq = engine.add(Request(system + [3, 4], 8))
    engine.run_until_done()
    assert seq.generated == cold
    assert engine.pool.stats.prefix_hit_tokens == 32 and engine.stats.rows - before == 2 + 7


def test_preemption_with_a_tiny_pool_completes_every_request(runner):
    engine = Engine(runner)
    engine.pool = BlockPool(5, runner.block_size)  # 80 token slots for five sequences of up to 45 tokens
    engine.kv = KVCacheManager(engine.pool, runner.max_blocks)
    seqs = [engine.add(Request(p, 12)) for p in PROMPTS]
    engine.run_until_done()
    assert engine.stats.preemptions > 0
    assert [s.generated for s in seqs] == [_alone(runner, p, 12) for p in PROMPTS]
    assert engine.pool.available() == 5


def test_logits_for_selected_rows_equal_those_rows_of_the_full_step(runner):
    """The lm_head runs on just the requested rows (a smaller schedule's head); same numbers as all rows."""
    assert all(s.schedule.hidden for s in runner.steps), "every schedule should split off its lm_head"
    rows = 20  # a 64-row trunk; heads of 4 and 16 rows below
    tokens = np.arange(3, 3 + rows, dtype=np.int64)
    tables = np.broadcast_to(np.arange(runner.max_blocks, dtype=np.int32), (rows, runner.max_blocks))
    full = runner.run(tokens, np.arange(rows, dtype=np.int64), tables)
    for picked in ([19], [0, 7, 19], list(range(0, 20, 2)), []):
        some = runner.run(tokens, np.arange(rows, dtype=np.int64), tables, logits_rows=picked)
        assert some.shape == (len(picked), full.shape[1])
        np.testing.assert_allclose(some, full[picked], rtol=1e-5, atol=1e-5 * np.abs(full).max())
