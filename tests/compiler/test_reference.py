"""Reference executor: incremental decoding equals one long prefill; the cache is explicit state."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.config import ModelConfig, expected_weight_shapes
from bitsmith.compiler.frontends.llama import build_llama_module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError


def random_model(config: ModelConfig, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_weight_shapes(config).items():
        scale = 1.0 if len(shape) == 1 else 0.3
        weights[name] = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                         else scale * rng.standard_normal(shape)).astype(np.float32)
    return build_llama_module(config, {}), weights


CONFIGS = {
    "gqa": ModelConfig(architecture="llama", vocab_size=40, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8),
    "qwen3-interleaved": ModelConfig(architecture="qwen3", vocab_size=40, hidden_size=24, intermediate_size=40,
                                     num_layers=3, num_heads=3, num_kv_heads=1, head_dim=8, qk_norm=True,
                                     rope_style="interleaved", tie_word_embeddings=True),
    "window": ModelConfig(architecture="mistral", vocab_size=40, hidden_size=32, intermediate_size=40, num_layers=1,
                          num_heads=2, num_kv_heads=2, head_dim=16, sliding_window=4),
}


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
