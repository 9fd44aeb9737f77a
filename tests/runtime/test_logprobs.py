"""Logprobs in the engine: generated tokens' logprobs and top-k equal a CompiledSession's log_softmax; echo's prompt
logprobs equal tools/evaluate's scorer on the same tokens; batching, preemption and max_tokens 0."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.session import CompiledSession
from bitsmith.tools.evaluate import CompiledScorer

OPTIONS = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32),
                         memory=MemoryOptions(context=64, concurrency=8))  # test_server's: compiled once a session
TOL = 1e-5  # logprobs: the same kernels on other row counts (fp32 logits, float64 log_softmax)


@pytest.fixture(scope="module")
def art(tiny_artifact):
    return load_artifact(tiny_artifact(OPTIONS))


def reference_logprobs(art, tokens):
    """[len(tokens) - 1, vocab] float64 log_softmax of one CompiledSession's logits (row i predicts tokens[i + 1])."""
    logits = CompiledSession(art).prefill(tokens).astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    return (shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True)))[:-1]


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, 96, size=int(rng.integers(3, 20)))] for _ in range(n)]


def test_generated_logprobs_and_top_k_equal_the_session(art):
    engine = Engine(KernelRunner(art))
    seqs = [engine.add(Request(p, 8, SamplingParams(temperature=0.9, seed=i), logprobs=[0, 1, 5, 20][i % 4],
                               stop_ids=(2, 7, 11)))
            for i, p in enumerate(prompts(6))]
    plain = engine.add(Request(prompts(1, seed=9)[0], 8))  # no logprobs asked: none kept
    engine.run_until_done()
    assert plain.logprobs == []
    for seq in seqs:
        k = seq.request.logprobs
        stopped = seq.logprobs[-1].token in seq.request.stop_ids  # the stop id that ended it is scored too
        assert len(seq.logprobs) == len(seq.generated) + stopped > 0
        ref = reference_logprobs(art, seq.tokens + [seq.logprobs[-1].token] * stopped)[len(seq.request.prompt) - 1:]
        for entry, token, row in zip(seq.logprobs, seq.generated + [seq.logprobs[-1].token] * stopped, ref):
            assert entry.token == token and abs(entry.logprob - row[token]) < TOL
            assert len(entry.top) == k
            ids = [i for i, _ in entry.top]
            values = np.array([v for _, v in entry.top])
            assert np.all(np.diff(values) <= 0)  # most likely first
            np.testing.assert_allclose(values, row[ids], atol=TOL)
            if k:  # the top k are the k largest of the reference row (up to near-ties at the cut)
                assert values[-1] >= np.sort(row)[-k] - TOL
                assert entry.top[0][0] == int(np.argmax(row)) or row[entry.top[0][0]] >= row.max() - TOL


def test_echo_prompt_logprobs_equal_the_evaluate_scorer(art):
    scorer = CompiledScorer(art, 64)
    engine = Engine(KernelRunner(art))
    long = prompts(1, seed=3)[0] * 4  # longer than a step's rows: scored across prefill chunks
    cases = [(p, n) for p, n in zip(prompts(4, seed=1) + [long], [0, 1, 0, 3, 0])]
    seqs = [engine.add(Request(p, n, SamplingParams(temperature=0), echo_logprobs=True, logprobs=1))
            for p, n in cases]
    engine.run_until_done()
    for seq, (prompt, n) in zip(seqs, cases):
        ref = scorer.logprobs(prompt)
        assert seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == len(prompt)
        np.testing.assert_allclose(seq.prompt_logprobs[1:], ref[np.arange(len(prompt) - 1), prompt[1:]], atol=TOL)
        k = seq.request.logprobs
        assert seq.prompt_top_logprobs[0] is None and len(seq.prompt_top_logprobs) == len(prompt)
        for top, row in zip(seq.prompt_top_logprobs[1:], ref):
            assert top[0][0] == int(np.argmax(row)) and abs(top[0][1] - row.max()) < TOL and len(top) == k
        assert len(seq.generated) == n and seq.finish_reason in ("length", "stop")
    assert sum(len(s.generated) for s in seqs) == 4
    with pytest.raises(BitsmithError, match="max_tokens 0"):
        engine.add(Request([5, 6], 0))
    with pytest.raises(BitsmithError, match="logprobs 21"):
        engine.add(Request([5, 6], 1, logprobs=21))


def test_echo_skips_the_prefix_cache_and_survives_preemption(art):
    runner = KernelRunner(art)
    engine = Engine(runner)
    prompt = prompts(1, seed=5)[0] * 3
    first = engine.add(Request(prompt, 2, SamplingParams(temperature=0)))
    engine.run_until_done()
    again = engine.add(Request(prompt, 2, SamplingParams(temperature=0), echo_logprobs=True))
    engine.run_until_done()
    assert again.generated == first.generated and len(again.prompt_logprobs) == len(prompt)
    # a preempted echo sequence recomputes its prompt and keeps the logprobs it had (no duplicates)
    engine = Engine(runner)
    seq = engine.add(Request(prompt, 4, SamplingParams(temperature=0), echo_logprobs=True, logprobs=2))
    engine.step()
    engine.step()
    engine._preempt_newest()
    engine.run_until_done()
    assert seq.preemptions == 1 and len(seq.prompt_logprobs) == len(prompt)
    assert len(seq.logprobs) == len(seq.generated) + (seq.logprobs[-1].token in seq.request.stop_ids)
    np.testing.assert_allclose(seq.prompt_logprobs[1:], again.prompt_logprobs[1:], atol=TOL)
