"""Each op's numpy reference against torch / transformers on random inputs (odd sizes included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from bitsmith.compiler.ops import OPS, RefContext

RNG = np.random.default_rng(0)
CTX = RefContext(weights={}, dims={})


def ref(op: str, *inputs: np.ndarray, **attrs) -> list[np.ndarray]:
    return OPS[op].ref(list(inputs), attrs, CTX)


def rand(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def close(ours: np.ndarray, theirs: torch.Tensor, tol: float = 1e-5) -> None:
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=tol, atol=tol)


@pytest.mark.parametrize("shape", [(3, 7), (5, 2, 33)])
def test_norms(shape):
    x, w, b = rand(*shape), rand(shape[-1]), rand(shape[-1])
    t = torch.from_numpy
    rms = t(x) * torch.rsqrt(t(x).pow(2).mean(-1, keepdim=True) + 1e-5) * t(w)
    close(ref("rmsnorm", x, w, eps=1e-5)[0], rms)
    close(ref("layernorm", x, w, b, eps=1e-5)[0], F.layer_norm(t(x), (shape[-1],), t(w), t(b), 1e-5), 1e-4)


def test_elementwise_and_activations():
    x, y = rand(4, 9), rand(1, 9)
    t = torch.from_numpy
    close(ref("silu", x)[0], F.silu(t(x)))
    close(ref("gelu", x)[0], F.gelu(t(x)))
    close(ref("gelu", x, approximate="tanh")[0], F.gelu(t(x), approximate="tanh"))
    close(ref("softmax", x, axis=-1)[0], torch.softmax(t(x), -1))
    close(ref("div", x, y)[0], t(x) / t(y), 1e-4)
    close(ref("mean", x, axes=[1], keepdim=True)[0], t(x).mean(1, keepdim=True))
    a, b = rand(2, 3, 5), rand(5, 4)
    close(ref("matmul", a, b)[0], t(a) @ t(b), 1e-4)


def test_linear_with_bias():
    x, w, b = rand(6, 13), rand(7, 13), rand(7)
    close(ref("linear", x, w, b)[0], F.linear(*map(torch.from_numpy, (x, w, b))), 1e-4)


@pytest.mark.parametrize("rotary_dim", [16, 8])
def test_rope_half_matches_transformers(rotary_dim):
    from transformers.models.llama.modeling_llama import rotate_half

    seq, heads, d, theta = 5, 3, 16, 10000.0
    x, pos = rand(seq, heads, d), np.array([0, 3, 4, 9, 17])
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))
    freqs = torch.from_numpy(pos).float()[:, None] * inv[None]
    emb = torch.cat([freqs, freqs], -1)[:, None, :]
    xt = torch.from_numpy(x)
    rot = xt[..., :rotary_dim] * emb.cos() + rotate_half(xt[..., :rotary_dim]) * emb.sin()
    expected = torch.cat([rot, xt[..., rotary_dim:]], -1)
    close(ref("rope", x, pos, theta=theta, style="half", rotary_dim=rotary_dim)[0], expected, 1e-5)


def test_rope_interleaved_is_half_on_permuted_dims():
    x, pos = rand(4, 2, 8), np.arange(4)
    perm = np.concatenate([np.arange(0, 8, 2), np.arange(1, 8, 2)])  # interleaved pairs -> halves
    inter = ref("rope", x, pos, theta=500.0, style="interleaved")[0]
    half = ref("rope", x[..., perm], pos, theta=500.0, style="half")[0]
    np.testing.assert_allclose(inter[..., perm], half, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_sdpa_and_fills_cache(window):
    seq, heads, kv, d = 6, 4, 2, 8
    q, k, v = rand(seq, heads, d), rand(seq, kv, d), rand(seq, kv, d)
    cache = np.zeros((2, 2, 10, kv, d), np.float32)
    out, cache = ref("attention", q, k, v, np.arange(seq), cache, layer=1, scale=d**-0.5, sliding_window=window)
    np.testing.assert_array_equal(cache[1, 0, :seq], k)
    assert not cache[0].any() and not cache[1, :, seq:].any()
    i, j = np.arange(seq)[:, None], np.arange(seq)[None, :]
    mask = (j <= i) & ((j > i - window) if window else True)
    qt = torch.from_numpy(q).transpose(0, 1)
    kt = torch.from_numpy(k).transpose(0, 1).repeat_interleave(heads // kv, 0)
    vt = torch.from_numpy(v).transpose(0, 1).repeat_interleave(heads // kv, 0)
    expected = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=torch.from_numpy(mask)).transpose(0, 1)
    close(out, expected, 1e-5)


def test_embedding_rejects_out_of_range_ids():
    with pytest.raises(IndexError, match="out of range"):
        ref("embedding", rand(5, 3), np.array([1, 5]))
