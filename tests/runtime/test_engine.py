"""Continuous batching and the paged KV bookkeeping, on a toy runner whose logits depend on the cached history."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.kv_cache import BlockPool, KVCacheManager, SequenceBlocks, block_hashes

VOCAB = 50


class ToyRunner:
    """Stores each token id in its (block, slot) and scores the next token from the history it reads back
    through the row's block table: wrong tables, lost or stale blocks change the output."""

    def __init__(self, num_blocks: int, block_size: int = 4, max_rows: int = 4, max_context: int = 64) -> None:
        self.num_blocks, self.block_size, self.max_rows = num_blocks, block_size, max_rows
        self.max_context, self.max_blocks = max_context, max_context // block_size
        self.pool = np.full((num_blocks, block_size), -1, dtype=np.int64)
        self.calls = []

    def run(self, tokens, positions, tables, logits_rows=None):
        assert len(tokens) <= self.max_rows
        self.calls.append(len(tokens))
        self.logits_rows = logits_rows
        for t, p, table in zip(tokens, positions, tables):
            self.pool[table[p // self.block_size], p % self.block_size] = t
        logits = np.zeros((len(tokens), VOCAB), dtype=np.float32)
        for i, (p, table) in enumerate(zip(positions, tables)):
            history = [self.pool[table[s // self.block_size], s % self.block_size] for s in range(p + 1)]
            assert min(history) >= 0, "read a slot nobody wrote"
            logits[i, (sum((s + 1) * h for s, h in enumerate(history)) * 7 + 3) % VOCAB] = 1.0
        return logits if logits_rows is None else logits[logits_rows]


def _alone(prompt, n, **kw):
    engine = Engine(ToyRunner(64, **kw))
    seq = engine.add(Request(prompt, n))
    engine.run_until_done()
    return seq.generated


PROMPTS = [[1, 2, 3], [4] * 11, [5, 6, 7, 8, 9, 10, 11, 12, 13], [2, 3], list(range(20, 37))]


def test_batched_equals_alone_and_every_block_is_freed():
    engine = Engine(ToyRunner(64))
    seqs = [engine.add(Request(p, 6 + i)) for i, p in enumerate(PROMPTS)]
    engine.run_until_done()
    for i, (seq, prompt) in enumerate(zip(seqs, PROMPTS)):
        assert seq.generated == _alone(prompt, 6 + i) and seq.finish_reason == "length"
    assert engine.pool.available() == 64 and not (engine.pool.refcount != 0).any()
    assert max(engine.runner.calls) == 4 and engine.stats.steps < sum(len(p) + 6 + i for i, p in enumerate(PROMPTS))


def test_prefix_cache_hit_gives_the_same_output_and_skips_prefill():
    system = list(range(30, 42))  # three full blocks of 4
    engine = Engine(ToyRunner(64))
    first = engine.add(Request(system + [7, 8], 5))
    engine.run_until_done()
    rows_before = engine.stats.rows
    second = engine.add(Request(system + [9], 5))
    engine.run_until_done()
    assert second.generated == _alone(system + [9], 5)
    assert engine.pool.stats.prefix_hit_tokens == 12
    assert engine.stats.rows - rows_before == 1 + 5 - 1  # only the new prompt token, then decode steps
    assert first.generated == _alone(system + [7, 8], 5)
    assert engine.pool.available() == 64


def test_preemption_under_a_tiny_pool_completes_every_request_correctly():
    engine = Engine(ToyRunner(9, max_rows=4, max_context=36))
    seqs = [engine.add(Request(p[:12], 10)) for p in PROMPTS]
    engine.run_until_done()
    assert engine.stats.preemptions > 0
    for seq, prompt in zip(seqs, PROMPTS):
        assert seq.generated == _alone(prompt[:12], 10, max_context=36)
    assert engine.pool.available() == 9


def test_stop_ids_and_bad_requests():
    out = _alone([1, 2, 3], 8)
    engine = Engine(ToyRunner(64))
    seq = engine.add(Request([1, 2, 3], 8, stop_ids=(out[2],)))
    engine.run_until_done()
    assert seq.generated == out[:2] and seq.finish_reason == "stop"
    with pytest.raises(BitsmithError, match="exceed the context"):
        engine.add(Request([1] * 60, 10))
    with pytest.raises(BitsmithError, match="max_tokens"):
        engine.add(Request([1], 0))


def test_block_pool_lru_eviction_and_refcounts():
    pool = BlockPool(3, 4)
    kv = KVCacheManager(pool, 8)
    a = SequenceBlocks()
    tokens = list(range(9))
    assert kv.ensure(a, 9) and len(a.table) == 3 and pool.available() == 0
    kv.publish_full_blocks(a, tokens, 9)
    kv.free(a)
    assert pool.available() == 3 and len(pool.evictable) == 2  # two full blocks stay cached
    b = SequenceBlocks()
    assert kv.match_prefix(b, tokens) == 8 and pool.available() == 1
    c = SequenceBlocks()
    assert not kv.ensure(c, 8) and c.table == []  # nothing half-allocated
    kv.free(b)
    assert kv.ensure(c, 12) and pool.stats.evictions == 2
    assert block_hashes([1, 2, 3, 4, 5], 4) != block_hashes([0, 2, 3, 4, 5], 4)


def test_only_rows_that_are_sampled_ask_for_logits():
    runner = ToyRunner(64)
    engine = Engine(runner)
    engine.add(Request([4] * 11, 2))  # prefill chunks of 4, 4, 3 rows, then one decode row
    asked = []
    while engine.has_work():
        engine.step()
        asked.append(list(runner.logits_rows))
    assert asked == [[], [], [2], [0]]


class SteppedRunner(ToyRunner):
    """A ToyRunner whose calls pay for the smallest of `step_rows` that holds them (like KernelRunner)."""

    step_rows = (1, 4, 16, 32, 64)

    def __init__(self) -> None:
        super().__init__(256, max_rows=64, max_context=128)


def test_prefill_chunks_fill_a_step_instead_of_padding_to_the_next():
    engine = Engine(SteppedRunner())
    running = [engine.add(Request([3 + i, 4, 5], 40)) for i in range(15)]
    engine.step()  # 45 prompt rows would pay for 64: 32 now, the rest in later steps
    assert engine.runner.calls == [32]
    while any(seq.computed < len(seq.tokens) - 1 for seq in running):
        engine.step()
    # from 16 rows up no step is padded to a larger size because of prompt rows
    assert all(n in SteppedRunner.step_rows or n < 16 for n in engine.runner.calls), engine.runner.calls
    late = engine.add(Request(list(range(60, 92)), 4))  # 15 decode rows + 32 prompt rows = 47: 32 now
    engine.step()
    assert engine.runner.calls[-1] == 32 and late.computed == 17
    engine.step()  # 15 decode rows + the other 15 prompt rows
    assert engine.runner.calls[-1] == 30
    engine.run_until_done()
    assert late.generated == _alone(list(range(60, 92)), 4, max_rows=64, max_context=128)
    assert [seq.generated for seq in running] == [_alone([3 + i, 4, 5], 40, max_rows=64, max_context=128)
                                                  for i in range(15)]
    small = Engine(SteppedRunner())
    small.add(Request(list(range(1, 11)), 2))  # under 16 rows: not split (a 4-row step + a 6-row step)
    small.step()
    assert small.runner.calls == [10]
