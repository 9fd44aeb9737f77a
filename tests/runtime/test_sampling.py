"""Sampling: greedy is argmax, seeds reproduce, top-k/top-p restrict the support."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.runtime.sampling import SamplingParams, sample_token

LOGITS = np.array([0.1, 2.0, 1.9, -1.0, 0.5], dtype=np.float32)


def draws(params: SamplingParams, n: int = 400) -> list[int]:
    rng = np.random.default_rng(params.seed)
    return [sample_token(LOGITS, params, rng) for _ in range(n)]


def test_greedy_is_argmax():
    assert set(draws(SamplingParams(temperature=0.0), 5)) == {1}


def test_seed_reproduces_and_differs():
    a = draws(SamplingParams(temperature=1.0, seed=3))
    assert a == draws(SamplingParams(temperature=1.0, seed=3))
    assert a != draws(SamplingParams(temperature=1.0, seed=4))
    assert set(a) == {0, 1, 2, 3, 4}


def test_top_k_and_top_p_restrict_support():
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0))) == {1, 2}
    # p(1) ~ 0.42, p(2) ~ 0.38: top_p 0.5 needs both, top_p 0.3 only the first
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.5, seed=0))) == {1, 2}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.3, seed=0))) == {1}


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_k": -2}])
def test_bad_params(kwargs):
    with pytest.raises(BitsmithError):
        SamplingParams(**kwargs)
