"""Attention kernels against the numpy oracle (`_attention_ref`): outputs and the updated KV cache."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.attention import AttentionSpec, heads_per_task
from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.target import host_target
from bitsmith.compiler.ops.llm import _attention_ref
from bitsmith.errors import BitsmithError

HEADS = ((4, 4), (8, 4), (9, 3), (3, 1))  # (query heads, kv heads)
HEAD_DIMS = (16, 64, 80)
SHAPES = ((1, 64, None), (16, 300, None), (5, 300, 8), (16, 64, 8))  # (rows, ctx, sliding window)
SPECS = [AttentionSpec(rows, h, kv, d, ctx, 1.0 / np.sqrt(d), window)
         for h, kv in HEADS for d in HEAD_DIMS for rows, ctx, window in SHAPES]
SPECS += [AttentionSpec(1, 9, 3, 64, 300, 0.125, 8), AttentionSpec(5, 8, 4, 16, 64, 0.3, None)]
TOL = 1e-5


def _scenarios(spec: AttentionSpec) -> list[tuple[str, int, int]]:
    """(label, first position, valid rows): the remaining rows are padding (position -1)."""
    rows, ctx = spec.rows, spec.ctx
    pad = {1: 0, 5: 2, 16: 3}.get(rows, 0)
    out = [("from0", 0, rows), ("mid", ctx // 2 - 3, rows), ("end", ctx - rows, rows)]
    if pad:
        out += [("from0_pad", 0, rows - pad), ("mid_pad", ctx // 3 + 1, rows - pad)]
    else:
        out += [("padding_only", 0, 0)]
    return out


def _run(spec: AttentionSpec, start: int, valid: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    rows, h, kv, d, ctx = spec.rows, spec.heads, spec.kv_heads, spec.head_dim, spec.ctx
    q = rng.standard_normal((rows, h, d)).astype(np.float32)
    k = rng.standard_normal((rows, kv, d)).astype(np.float32)
    v = rng.standard_normal((rows, kv, d)).astype(np.float32)
    positions = np.full(rows, -1, np.int64)
    positions[:valid] = start + np.arange(valid)
    # slots before the chunk hold earlier tokens; slots after it hold NaN (must never be read)
    cache = np.full((2, ctx, kv, d), np.nan, np.float32)
    cache[:, :start] = rng.standard_normal((2, start, kv, d)).astype(np.float32) * 2
    expect_cache = cache.copy()[None]  # the oracle takes the whole [layers, 2, ctx, kv, d] cache
    attrs = {"layer": 0, "scale": spec.scale, "sliding_window": spec.sliding_window}
    if valid:
        expect, expect_cache = _attention_ref([q[:valid], k[:valid], v[:valid], positions[:valid], expect_cache],
                                              attrs, None)
    else:  # the oracle cannot take zero rows
        expect = np.zeros((0, h, d), np.float32)
    out = np.full((rows, h, d), np.nan, np.float32)
    call_kernel(spec, [q, k, v, positions, cache], [out])
    np.testing.assert_allclose(out[:valid], expect, rtol=TOL, atol=TOL)
    assert np.all(out[valid:] == 0), "padding rows must produce zeros"
    np.testing.assert_array_equal(cache, expect_cache[0])  # exact, NaN slots included


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_attention_matches_oracle(spec):
    for label, start, valid in _scenarios(spec):
        try:
            _run(spec, start, valid)
        except AssertionError as err:
            raise AssertionError(f"scenario {label} (start {start}, {valid} valid rows): {err}") from None


def test_window_of_one_and_unaligned_head_dim():
    """A window of 1 attends only to the row's own token; head_dim 24/36 use narrower vectors."""
    for spec in (AttentionSpec(4, 4, 2, 24, 40, 0.2, 1), AttentionSpec(3, 6, 2, 36, 50, 0.2, 3)):
        _run(spec, 10, spec.rows)
        _run(spec, 0, spec.rows - 1)


def test_decode_sequence_accumulates_cache():
    """Decoding token by token through one cache equals one oracle call over the whole prefix."""
    spec = AttentionSpec(1, 9, 3, 64, 64, 0.125, None)
    rng = np.random.default_rng(1)
    n = 40
    q = rng.standard_normal((n, 9, 64)).astype(np.float32)
    k = rng.standard_normal((n, 3, 64)).astype(np.float32)
    v = rng.standard_normal((n, 3, 64)).astype(np.float32)
    cache = np.zeros((2, 64, 3, 64), np.float32)
    outs = np.zeros((n, 9, 64), np.float32)
    for t in range(n):
        call_kernel(spec, [q[t:t + 1], k[t:t + 1], v[t:t + 1], np.array([t], np.int64), cache], [outs[t:t + 1]])
    attrs = {"layer": 0, "scale": 0.125, "sliding_window": None}
    expect, expect_cache = _attention_ref([q, k, v, np.arange(n), np.zeros((1, 2, 64, 3, 64), np.float32)],
                                          attrs, None)
    np.testing.assert_allclose(outs, expect, rtol=TOL, atol=TOL)
    np.testing.assert_array_equal(cache, expect_cache[0])


def test_spec_names_and_validation():
    a = AttentionSpec(16, 9, 3, 64, 2048, 0.125, None)
    others = [(16, 9, 3, 64, 2048, 0.125, 8), (16, 9, 3, 64, 2048, 0.1, None), (1, 9, 3, 64, 2048, 0.125, None),
              (16, 9, 9, 64, 2048, 0.125, None), (16, 9, 3, 64, 1024, 0.125, None)]
    names = {a.name} | {AttentionSpec(*fields).name for fields in others}
    assert len(names) == 6 and all(n.isidentifier() for n in names)
    func = a.prim_func(host_target())
    assert func.attrs["global_symbol"] == a.name
    assert [p.name for p in func.params] == ["q", "k", "v", "positions", "cache", "out"]
    assert 1 <= heads_per_task(a, host_target()) <= 3
    for bad in ((1, 9, 4, 64, 64, 0.1, None), (1, 4, 4, 64, 64, 0.1, 0), (0, 4, 4, 64, 64, 0.1, None),
                (1, 4, 4, 64, 64, float("nan"), None), (1, 4, 4, 128, 1 << 22, 0.1, None)):
        with pytest.raises(BitsmithError):
            AttentionSpec(*bad)
