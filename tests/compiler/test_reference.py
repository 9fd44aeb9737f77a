"""Reference executor: incremental decoding equals one long prefill; the cache is explicit state."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from conftest import RANDOM_CONFIGS as CONFIGS, random_model


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("length", [2, 7, 12])
def test_prefill_T_equals_prefill_T_minus_1_then_decode(name, length):
    module, weights = random_model(CONFIGS[name])
    tokens = list(np.random.default_rng(length).integers(0, 40, size=length))
    full = ReferenceSession(module, weights, 16).prefill(tokens)
    step = ReferenceSession(module, weights, 16)
    head = step.prefill(tokens[:-1])
    last = step.decode(tokens[-1])
    np.testing.assert_allclose(head, full[:-1], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(last, full[-1], rtol=1e-5, atol=1e-5)


def test_context_overflow_is_refused():
    module, weights = random_model(CONFIGS["gqa"])
    session = ReferenceSession(module, weights, 4)
    session.prefill([1, 2, 3, 4])
    with pytest.raises(BitsmithError, match="exceed the context of 4"):
        session.decode(5)
