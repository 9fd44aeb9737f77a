"""The `serve` suite: `bitsmith bench` inside the report: latency and throughput at each concurrency, for the
artifact and its reference on the same engine and prompts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from bitsmith.runtime.bench import agreement_with_first, bench_prompts, run_concurrency
from bitsmith.runtime.engine import Engine
from bitsmith.tools.suites import SUITES, SuiteOptions, SuiteResult
from bitsmith.tools.suites.generate import Generator, memoized
from bitsmith.tools.suites.reference import resolve_reference

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 64


def bench_levels(gen: Generator, levels: tuple[int, ...]) -> list[dict]:
    """One closed-loop run per level (requests: max(4, 2 x concurrency), as `bitsmith bench`)."""
    prompt_of = bench_prompts(gen.tokenizer, min(PROMPT_TOKENS, gen.max_context // 2))
    output = min(OUTPUT_TOKENS, gen.max_context // 4)

    def measure() -> list[dict]:
        results = [run_concurrency(lambda: Engine(gen.runner, gen.tokenizer), prompt_of, output, c, max(4, 2 * c))
                   for c in levels]
        return [r.to_json() for r in agreement_with_first(results)]
    return memoized(gen.path, ("serve", levels), measure)  # with generate.MEMO on: measured once per process


def _metrics(results: list[dict], prefix: str) -> dict[str, float]:
    metrics = {}
    for r in results:  # every level: a gate may name the latency at any level it asks for
        level = r["concurrency"]
        metrics[f"{prefix}tok_s_c{level}"] = r["throughput_tok_s"]
        metrics[f"{prefix}ttft_ms_c{level}"] = r["ttft_ms_median"]
        metrics[f"{prefix}itl_ms_c{level}"] = r["itl_ms_median"]
    return metrics


def run_serve(artifact: str | Path, reference: str | Path | None, options: SuiteOptions,
              log: Callable[[str], None] | None = None) -> SuiteResult:
    start = time.perf_counter()
    ref_path, ref_desc = resolve_reference(artifact, reference, log)
    model = Generator(artifact, options.executor, "artifact")
    levels = tuple(options.concurrency)
    t0 = time.perf_counter()
    mine = bench_levels(model, levels)
    artifact_seconds = time.perf_counter() - t0
    metrics = _metrics(mine, "")
    details = {"prompt_tokens": min(PROMPT_TOKENS, model.max_context // 2),
               "output_tokens": min(OUTPUT_TOKENS, model.max_context // 4), "artifact": mine,
               "artifact_seconds": artifact_seconds}
    if Path(ref_path).resolve() == Path(artifact).resolve():
        details["reference"], details["reference_seconds"] = mine, 0.0
        metrics.update(_metrics(mine, "ref_"))
    else:
        t0 = time.perf_counter()
        theirs = bench_levels(Generator(ref_path, options.executor, "reference"), levels)
        details["reference"], details["reference_seconds"] = theirs, time.perf_counter() - t0
        metrics.update(_metrics(theirs, "ref_"))
    return SuiteResult("serve", metrics, details, time.perf_counter() - start, ref_desc)


SUITES["serve"] = run_serve
