"""`bitsmith bench`: time to first token, inter-token latency and throughput at several concurrencies."""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from bitsmith.runtime.engine import Engine, Request, Sequence

BENCH_TEXT = ("The old lighthouse keeper climbed the stairs every evening, counting the steps and listening "
              "to the sea. Ships passed far away, and the light turned slowly over the water. ")


@dataclass(frozen=True)
class BenchResult:
    concurrency: int
    requests: int
    prompt_tokens: int
    output_tokens: int
    ttft_ms_median: float
    ttft_ms_p90: float
    itl_ms_median: float
    throughput_tok_s: float  # generated tokens per second of wall time
    wall_s: float
    # of the requests the first level also ran, the share whose first generated token is the first
    # level's (set by `agreement_with_first`): a smoke alarm for batched kernels that disagree with small
    # steps. Later tokens may rightly differ: with int8 activations a tiny float difference flips a
    # rounding, outputs then depend on how rows were batched (logits rms ~0.2 apart on SmolLM2), and
    # greedy decoding follows the first near-tie apart
    same_as_first: float | None = None
    # with several rounds (`run_rounds`): every round's throughput, and the median over rounds of this
    # level's throughput / the first level's in the same round
    rounds_tok_s: tuple[float, ...] = ()
    ratio_to_first: float | None = None
    outputs: tuple[tuple[int, ...], ...] = field(default=(), repr=False, compare=False)

    def to_json(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "outputs"}


def agreement_with_first(results: list[BenchResult]) -> list[BenchResult]:
    """`results` with `same_as_first` set: request i has the same prompt at every level and decoding is
    greedy, so its first token should not depend on how many other sequences shared its steps."""
    if not results:
        return results
    first = results[0].outputs
    out = []
    for r in results:
        pairs = [(a[0], b[0]) for a, b in zip(first, r.outputs) if a and b]
        same = sum(a == b for a, b in pairs) / len(pairs) if pairs else None
        out.append(dataclasses.replace(r, same_as_first=same))
    return out


def run_rounds(run_level: Callable[[int], BenchResult], levels: list[int], rounds: int) -> list[BenchResult]:
    """Every level `rounds` times, interleaved (c1, c4, c16, c1, ...): per level the run of median
    throughput, with every round's throughput and the median per-round ratio to the first level. On a
    shared machine memory and compute speed drift over minutes; within a round the levels run close
    together, so a ratio of the same round cancels most of the drift that one pass of levels keeps."""
    runs = [[run_level(c) for c in levels] for _ in range(rounds)]
    out = []
    for i in range(len(levels)):
        mine = sorted((r[i] for r in runs), key=lambda r: r.throughput_tok_s)
        ratios = [r[i].throughput_tok_s / r[0].throughput_tok_s for r in runs]
        out.append(dataclasses.replace(mine[(len(mine) - 1) // 2], ratio_to_first=statistics.median(ratios),
                                       rounds_tok_s=tuple(r[i].throughput_tok_s for r in runs)))
    return out


def bench_prompts(tokenizer: Any, tokens: int) -> Callable[[int], list[int]]:
    """Request i's prompt: "Request i." then the bench text, `tokens` tokens in all. The numbered
    start makes every prompt's first KV block (and so, hashes being chained, every block) distinct,
    so prefix caching skips no prefill: each request pays for its whole prompt."""
    body: list[int] = []
    while len(body) < tokens:
        body += tokenizer.encode(BENCH_TEXT, add_bos=False)

    def prompt(i: int) -> list[int]:
        return (tokenizer.encode(f"Request {i}. ", add_bos=False) + body)[:tokens]
    return prompt


def run_concurrency(make_engine: Callable[[], Engine], prompt_of: Callable[[int], list[int]], output_tokens: int,
                    concurrency: int, requests: int) -> BenchResult:
    """A closed loop: `concurrency` requests in flight until `requests` have finished (greedy, no early
    stop); request i gets prompt_of(i)."""
    engine = make_engine()
    submitted: dict[int, float] = {}
    seqs: list[Sequence] = []
    token_times: dict[int, list[float]] = {}

    def submit() -> None:
        seq = engine.add(Request(prompt_of(len(seqs)), output_tokens))
        submitted[id(seq)] = time.perf_counter()
        token_times[id(seq)] = []
        seqs.append(seq)

    t0 = time.perf_counter()
    for _ in range(min(concurrency, requests)):
        submit()
    while engine.has_work():
        touched = engine.step()
        now = time.perf_counter()
        for seq in touched:
            token_times[id(seq)].append(now)
            if seq.done and len(seqs) < requests:
                submit()
    wall = time.perf_counter() - t0
    ttft = [token_times[id(s)][0] - submitted[id(s)] for s in seqs]
    itl = [b - a for s in seqs for a, b in zip(token_times[id(s)], token_times[id(s)][1:])]
    generated = sum(len(s.generated) for s in seqs)
    return BenchResult(concurrency, len(seqs), len(seqs[0].request.prompt), output_tokens, 1e3 * statistics.median(ttft),
                       1e3 * float(np.percentile(ttft, 90)), 1e3 * statistics.median(itl) if itl else 0.0,
                       generated / wall, wall, outputs=tuple(tuple(s.generated) for s in seqs))


def format_table(results: list[BenchResult]) -> str:
    first = results[0].concurrency if results else 1
    rounds = max((len(r.rounds_tok_s) for r in results), default=0)
    lines = [f"{'concurrency':>11} {'requests':>8} {'TTFT ms (p50/p90)':>18} {'ITL ms p50':>10} {'tok/s':>8} "
             f"{f'1st token = c{first}':>15}" + (f" {f'tok/s / c{first} (rounds)':>26}" if rounds > 1 else "")]
    for r in results:
        same = "-" if r.same_as_first is None else f"{100 * r.same_as_first:.0f}%"
        line = (f"{r.concurrency:>11} {r.requests:>8} {r.ttft_ms_median:>8.1f} / {r.ttft_ms_p90:>7.1f} "
                f"{r.itl_ms_median:>10.2f} {r.throughput_tok_s:>8.1f} {same:>15}")
        if rounds > 1:
            per_round = [t / f for t, f in zip(r.rounds_tok_s, results[0].rounds_tok_s)]
            line += f" {f'{r.ratio_to_first:.2f} ({min(per_round):.2f}-{max(per_round):.2f})':>26}"
        lines.append(line)
    if rounds > 1:
        lines.append(f"median of {rounds} interleaved rounds per level; ratios within each round")
    return "\n".join(lines)
