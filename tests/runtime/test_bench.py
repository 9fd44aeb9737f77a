"""`bitsmith bench`'s load generator: distinct prompts (no prefix-cache hits), every request counted."""

from __future__ import annotations

import pytest

from bitsmith.runtime.bench import (BenchResult, agreement_with_first, bench_prompts, format_table, run_concurrency,
                                    run_rounds)
from bitsmith.runtime.engine import Engine
from test_engine import ToyRunner


class WordTokenizer:
    """ids 3.. for words in order of first sight (enough for the bench text)."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return [self.ids.setdefault(w, 3 + len(self.ids) % 40) for w in text.split()]


def test_prompts_have_the_stated_length_and_distinct_first_blocks():
    prompt_of = bench_prompts(WordTokenizer(), 24)
    prompts = [prompt_of(i) for i in range(12)]
    assert all(len(p) == 24 for p in prompts)
    assert len({tuple(p[:4]) for p in prompts}) == 12  # the first 4-token block differs


def test_closed_loop_finishes_every_request_without_prefix_hits():
    engines = []

    def make_engine():
        engines.append(Engine(ToyRunner(64)))
        return engines[-1]

    result = run_concurrency(make_engine, bench_prompts(WordTokenizer(), 10), 5, concurrency=3, requests=7)
    assert result.requests == 7 and result.prompt_tokens == 10 and result.throughput_tok_s > 0
    assert engines[0].stats.rows == 7 * (10 + 5 - 1)  # every prompt token prefilled, every output decoded
    assert engines[0].pool.stats.prefix_hit_tokens == 0


class SkewedRunner(ToyRunner):
    """A ToyRunner whose steps of more than one row return another row's scores: a batched kernel bug."""

    def run(self, tokens, positions, tables, logits_rows=None):
        logits = super().run(tokens, positions, tables, logits_rows)
        return logits if len(tokens) == 1 else logits[::-1].copy()


def test_outputs_are_compared_with_the_first_level():
    prompt_of = bench_prompts(WordTokenizer(), 10)
    levels = [run_concurrency(lambda: Engine(ToyRunner(64)), prompt_of, 6, concurrency=c, requests=4) for c in (1, 3)]
    good = agreement_with_first(levels)
    assert [r.same_as_first for r in good] == [1.0, 1.0]  # greedy: batching changes nothing
    assert "100%" in format_table(good) and "outputs" not in good[1].to_json()
    skewed = run_concurrency(lambda: Engine(SkewedRunner(64)), prompt_of, 6, concurrency=3, requests=4)
    bad = agreement_with_first([levels[0], skewed])
    assert bad[1].same_as_first <= 0.5


def test_rounds_interleave_levels_and_report_medians_and_within_round_ratios():
    """Round r's speeds drift together (a machine getting slower): the median run per level, and the
    median of each round's ratio to the first level, which drift does not move."""
    calls = []

    def level(c):
        drift = 1.0 / (1 + len(calls) // 3)  # one slower machine per round of three levels
        calls.append(c)
        return BenchResult(c, 4, 10, 5, 1.0, 2.0, 3.0, 100.0 * c ** 0.5 * drift, 1.0)

    results = run_rounds(level, [1, 4, 16], rounds=3)
    assert calls == [1, 4, 16] * 3
    assert results[0].rounds_tok_s == pytest.approx((100.0, 50.0, 100.0 / 3))
    assert [r.throughput_tok_s for r in results] == [50.0, 100.0, 200.0]  # round 2 of 3 is every median
    assert [round(r.ratio_to_first, 6) for r in results] == [1.0, 2.0, 4.0]
    table = format_table(results)
    assert "4.00 (4.00-4.00)" in table and "3 interleaved rounds" in table
    assert "ratio_to_first" in results[2].to_json()
