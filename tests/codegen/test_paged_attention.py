"""Paged attention against a numpy oracle: each row's K/V gathered from the block pool through its block
table, then `_attention_ref` on that contiguous cache. Outputs, the updated pool and (int8, int4) scales."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.paged_attention import PagedAttentionSpec, heads_per_task, ring_blocks_needed
from bitsmith.codegen.target import host_target
from bitsmith.compiler.ops.llm import _attention_ref
from bitsmith.errors import BitsmithError
from bitsmith.runtime.kv_layout import int4_dequantize, int4_quantize, pack_int4, unpack_int4

TOL = 1e-5
DTYPES = ("float32", "float16", "int8")
KV_DTYPES = (*DTYPES, "int4")
HEADS = ((9, 3), (4, 4), (8, 2))  # (query heads, kv heads)
SHAPES = ((16, 16), (64, 32))  # (head_dim, block_size)
MAX_BLOCKS, NUM_BLOCKS = 6, 128
ERRORS: dict[str, list[float]] = {}  # max |out - out with float32 storage| per scenario (reported by -s runs)


def _spec(rows, heads, kv, d, bs, window, dtype, num_blocks=NUM_BLOCKS, max_blocks=MAX_BLOCKS, softcap=None):
    return PagedAttentionSpec(rows, heads, kv, d, bs, num_blocks, max_blocks, 1.0 / np.sqrt(d), window, dtype,
                              softcap)


# a covering set: every dtype meets every head layout, both (head_dim, block size) pairs, rows 1/5/16
# and both windows; plus the benchmarked decode shape (head_dim 64, blocks of 16)
SPECS = [_spec((1, 5, 16)[(i + j + t) % 3], h, kv, d, bs, (None, 8)[(i + j) % 2], dtype)
         for t, dtype in enumerate(DTYPES) for i, (h, kv) in enumerate(HEADS) for j, (d, bs) in enumerate(SHAPES)]
SPECS += [_spec(1, 9, 3, 64, 16, None, dtype) for dtype in DTYPES]
# the other pairings, and blocks of 8 (four per tile) and 64 (two tiles per block)
SPECS += [_spec(16, 4, 4, 16, 32, 8, "float32"), _spec(5, 8, 2, 32, 8, 8, "int8"),
          _spec(16, 9, 3, 16, 64, None, "float16")]
# int4 (two codes a byte, a step and a minimum per row): decode, prefill and mixed rows, windows, both block
# layouts, the decode shape and a soft-cap
SPECS += [_spec(5, 8, 2, 16, 16, 8, "int4"), _spec(1, 9, 3, 64, 16, None, "int4"),
          _spec(16, 4, 4, 32, 8, None, "int4"), _spec(16, 9, 3, 16, 64, 8, "int4", softcap=0.7),
          _spec(5, 4, 2, 20, 16, None, "int4")]  # head_dim 20: vectors of 4 lanes from 2 bytes
# Gemma 2's attention-logit soft-cap (0.7: most random scores are capped hard), with and without a window
SPECS += [_spec(5, 8, 2, 16, 16, 8, "float32", softcap=0.7), _spec(1, 9, 3, 64, 16, None, "int8", softcap=0.7),
          _spec(16, 4, 4, 32, 8, None, "float16", softcap=0.7)]
# head_dim = 2 mod 4 (vectors of 4 or 16 lanes, then a tail of 2; int4: the tail one byte): every dtype meets 6,
# 18 and 34, decode (1 row), mixed (5) and prefill (16) rows, one, three and four heads per task; then odd head_dims
# (tails of 3 and 1; int4 refused below), head_dim 20 with three heads a task (one tree of 3 vectors of 4 lanes),
# and tiny ones whose task has more heads than lanes (several trees): 2 (int4: one byte a vector), 3 (a tail of 1)
# and 1 (scalar "vectors")
NARROW_SPECS = [_spec((1, 5, 16)[(i + t) % 3], *((4, 4), (9, 3), (8, 2))[(i + t) % 3], d, (16, 8, 32)[i],
                      (None, 8)[i % 2], dtype) for t, dtype in enumerate(KV_DTYPES) for i, d in enumerate((6, 18, 34))]
NARROW_SPECS += [_spec(5, 9, 3, 7, 16, 8, "float32"), _spec(1, 8, 2, 9, 16, None, "int8"),
                 _spec(16, 4, 4, 7, 8, None, "float16"), _spec(5, 9, 3, 20, 16, None, "int4"),
                 _spec(16, 8, 2, 18, 16, 8, "int8", softcap=0.7), _spec(5, 8, 2, 2, 16, None, "int4"),
                 _spec(1, 12, 2, 3, 16, 8, "float32"), _spec(16, 8, 2, 1, 16, None, "int8")]
SPECS += NARROW_SPECS


def _store(x: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """float32 [..., d] -> the pool's stored form and (int8, int4) the per-vector scales."""
    if dtype == "int4":
        codes, scales = int4_quantize(x)
        return pack_int4(codes), scales
    if dtype == "float32":
        return x.astype(np.float32), None
    if dtype == "float16":
        return x.astype(np.float16), None
    scale = np.abs(x).max(axis=-1) / np.float32(127)
    scale = np.where(scale > 0, scale, np.float32(1)).astype(np.float32)
    return np.clip(np.rint(x / scale[..., None]), -127, 127).astype(np.int8), scale


def _load(cache: np.ndarray, scales: np.ndarray | None) -> np.ndarray:
    """The pool as float32 values (int8: code * scale; int4: min + code * step)."""
    if scales is not None and scales.ndim == cache.ndim:  # int4: [..., d / 2] bytes, [..., 2] scales
        return int4_dequantize(unpack_int4(cache), scales)
    return cache.astype(np.float32) * (1 if scales is None else scales[..., None])


def _reference(spec, q, k, v, positions, tables, cache, scales):
    """(out, pool after the writes, scales after the writes)."""
    cache = cache.copy()
    scales = None if scales is None else scales.copy()
    bs, ctx = spec.block_size, spec.max_blocks * spec.block_size
    for r, p in enumerate(positions):  # phase 1, in row order
        if 0 <= p < ctx and 0 <= tables[r, p // bs] < spec.num_blocks:
            for half, x in ((0, k[r]), (1, v[r])):
                stored, scale = _store(x, spec.kv_dtype)
                cache[tables[r, p // bs], half, p % bs] = stored
                if scale is not None:
                    scales[tables[r, p // bs], half, p % bs] = scale
    values = _load(cache, scales)
    out = np.zeros(q.shape, np.float32)
    attrs = {"layer": 0, "scale": spec.scale, "sliding_window": spec.sliding_window, "softcap": spec.softcap}
    for r, p in enumerate(positions):  # phase 2, one row at a time on its gathered contiguous cache
        if not 0 <= p < ctx:
            continue
        lo = 0 if spec.sliding_window is None else max(p - spec.sliding_window + 1, 0)
        blocks = tables[r, lo // bs:p // bs + 1]
        if np.any((blocks < 0) | (blocks >= spec.num_blocks)):
            continue  # the kernel gives zeros
        gathered = values[np.clip(tables[r], 0, spec.num_blocks - 1)]  # [max_blocks, 2, bs, kv, d]
        gathered = gathered.transpose(1, 0, 2, 3, 4).reshape(2, ctx, spec.kv_heads, spec.head_dim)
        gathered[:, :lo] = 0  # outside [lo, p]: other sequences' blocks, stale or NaN slots (masked anyway)
        gathered[:, p + 1:] = 0
        # k/v as stored, so that the oracle's own write of them is a no-op
        out[r], _ = _attention_ref([q[r:r + 1], gathered[0, p:p + 1], gathered[1, p:p + 1], np.array([p]),
                                    gathered[None]], attrs, None)
    return out, cache, scales


def _batch(spec, rng, seqs, padding, shared=(), reserve=0):
    """Inputs for sequences seqs = [(cached tokens, new rows)], `padding` padding rows, rows shuffled.

    Physical blocks are a random permutation of the pool; `shared` = [(i, j)]: sequence j's first block
    is sequence i's (a full prefix block, both sequences hold more than a block). Table entries past a
    sequence's blocks point at random other blocks; with a window, blocks wholly before every row's window
    are freed (-1). Unwritten slots hold NaN (int8: NaN scales), so reading one poisons the output.
    `reserve`: blocks for that many more tokens per sequence. Returns (inputs, unrounded float32 pool).
    """
    nb, bs, mb, kv, d = spec.num_blocks, spec.block_size, spec.max_blocks, spec.kv_heads, spec.head_dim
    rows = spec.rows
    free = list(rng.permutation(nb))
    tables, row_pos, row_seq = [], [], []
    pool32 = np.full((nb, 2, bs, kv, d), np.nan, np.float32)
    for i, (cached, new) in enumerate(seqs):
        assert cached + new + reserve <= mb * bs
        table = rng.integers(0, nb, mb).astype(np.int32)
        used = -(-(cached + new + reserve) // bs)
        for b in range(used):
            table[b] = free.pop()
        for a, j in shared:
            if j == i:
                assert cached >= bs and seqs[a][0] >= bs
                table[0] = tables[a][0]
        for s in range(cached):
            if np.isnan(pool32[table[s // bs], 0, s % bs, 0, 0]):  # a shared block is filled once
                pool32[table[s // bs], :, s % bs] = rng.standard_normal((2, kv, d)) * 2
        if spec.sliding_window is not None:
            first = max(cached - spec.sliding_window + 1, 0) // bs
            table[:first] = -1
        tables.append(table)
        row_pos += range(cached, cached + new)
        row_seq += [i] * new
    assert len(row_pos) + padding == rows
    order = rng.permutation(rows)
    positions = np.full(rows, -1, np.int64)
    block_tables = rng.integers(-3, 2 * nb, (rows, mb)).astype(np.int32)  # padding rows: garbage
    for slot, (p, i) in zip(order, zip(row_pos, row_seq)):
        positions[slot] = p
        block_tables[slot] = tables[i]
    q = rng.standard_normal((rows, spec.heads, d)).astype(np.float32)
    k = rng.standard_normal((rows, kv, d)).astype(np.float32)
    v = rng.standard_normal((rows, kv, d)).astype(np.float32)
    cache, scales = _store(np.nan_to_num(pool32), spec.kv_dtype)
    if spec.kv_dtype not in ("int8", "int4"):
        cache[np.isnan(pool32)] = np.nan
    else:
        scales[np.isnan(pool32[..., 0])] = np.nan
    return [q, k, v, positions, block_tables, cache] + ([scales] if scales is not None else []), pool32


def _scenarios(spec):
    """(label, sequences, padding rows, shared prefix pairs)."""
    bs, ctx = spec.block_size, spec.max_blocks * spec.block_size
    if spec.rows == 1:
        return [("decode", [(3 * bs + 5, 1)], 0, ()), ("first", [(0, 1)], 0, ()),
                ("last", [(ctx - 1, 1)], 0, ()), ("padding", [], 1, ())]
    if spec.rows == 5:
        return [("mixed", [(2 * bs - 1, 3), (bs + 7, 1), (2 * bs + 2, 1)], 0, [(1, 2)]),
                ("prefill_pad", [(bs - 2, 4)], 1, ())]
    return [("mixed", [(bs + 3, 8), (2 * bs + 9, 1), (bs + 1, 1)], 6, [(1, 2)]),
            ("decode16", [(int(n), 1) for n in np.linspace(bs, ctx - 1, 16)], 0, [(0, 5), (0, 9), (3, 4)]),
            ("prefill16", [(bs - 5, 16)], 0, ())]


def _check(spec, inputs, pool32, errors=None):
    expect, expect_cache, expect_scales = _reference(spec, *inputs[:6], inputs[6] if len(inputs) > 6 else None)
    args = [a.copy() for a in inputs]
    out = np.full((spec.rows, spec.heads, spec.head_dim), np.nan, np.float32)
    call_kernel(spec, args, [out])
    np.testing.assert_allclose(out, expect, rtol=TOL, atol=TOL)
    assert np.all(out[inputs[3] < 0] == 0), "padding rows must produce zeros"
    # the pool after the call, bit for bit (NaN slots included; float16 compared as bits)
    cache = args[5].view(np.uint16) if spec.kv_dtype == "float16" else args[5]
    np.testing.assert_array_equal(cache, expect_cache.view(np.uint16) if spec.kv_dtype == "float16" else expect_cache)
    if spec.kv_dtype in ("int8", "int4"):
        np.testing.assert_array_equal(args[6], expect_scales)
    if errors is not None and spec.kv_dtype != "float32":  # against float32 storage of the same values
        exact = PagedAttentionSpec(**{**spec.__dict__, "kv_dtype": "float32"})
        cache32 = pool32.copy()
        expect32, _, _ = _reference(exact, *inputs[:5], cache32, None)
        valid = inputs[3] >= 0
        errors.append(float(np.abs(out[valid] - expect32[valid]).max()) if valid.any() else 0.0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_paged_attention_matches_oracle(spec):
    errors = []
    for n, (label, seqs, padding, shared) in enumerate(_scenarios(spec)):
        inputs, pool32 = _batch(spec, np.random.default_rng(n), seqs, padding, shared)
        try:
            _check(spec, inputs, pool32, errors)
        except AssertionError as err:
            raise AssertionError(f"scenario {label}: {err}") from None
    ERRORS[spec.name] = errors
    if errors:  # rounding the stored K/V: the error against float32 storage stays small
        assert max(errors) < {"float16": 1e-2, "int8": 0.25, "int4": 1.0}[spec.kv_dtype], errors


def test_int8_rounding_ties_and_zero_rows():
    """Codes round half to even (numpy's rint) at exact .5 ties; an all-zero vector stores scale 1."""
    spec = _spec(2, 4, 2, 16, 16, None, "int8", num_blocks=4, max_blocks=2)
    inputs, pool32 = _batch(spec, np.random.default_rng(3), [(5, 1), (0, 1)], 0)
    ties = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.5, -3.5, 100.5, -126.5, 7, 0, -8.5, 9.5],
                    np.float32)
    inputs[1][:, 0] = ties  # scale exactly 1: x / scale = x
    inputs[2][:, 0] = ties / 2  # scale 0.5: the same codes
    inputs[1][:, 1] = 0
    _check(spec, inputs, pool32)
    args = [a.copy() for a in inputs]
    call_kernel(spec, args, [np.zeros((2, 4, 16), np.float32)])
    r = int(np.argmax(inputs[3] == 5))
    block = inputs[4][r, 0]
    assert list(args[5][block, 0, 5, 0]) == [127, 0, 2, 2, 0, -2, -2, 126, 4, -4, 100, -126, 7, 0, -8, 10]
    assert args[6][block, 0, 5, 1] == 1 and not args[5][block, 0, 5, 1].any()


def test_invalid_block_tables_write_nothing_and_give_zeros():
    """Out-of-pool table entries are never dereferenced: no write, zeros for rows that would read them."""
    spec = _spec(4, 4, 2, 16, 16, 8, "float32", num_blocks=8, max_blocks=4)
    inputs, pool32 = _batch(spec, np.random.default_rng(4), [(20, 1), (40, 1), (30, 1), (9, 1)], 0)
    pos, tables = inputs[3], inputs[4]
    rows = {int(p): r for r, p in enumerate(pos)}
    tables[rows[20], 0] = -5  # its window [13, 20] starts there: zeros (its write to block 1 happens)
    tables[rows[30], 1] = 8  # its write block: no write, zeros
    tables[rows[40], 0] = 1 << 30  # wholly before its window [33, 40]: never read, a normal result
    tables[rows[9], 2] = 1 << 30  # past its position: never read
    _check(spec, inputs, pool32)
    out = np.full((4, 4, 16), np.nan, np.float32)
    call_kernel(spec, [a.copy() for a in inputs], [out])
    assert not out[rows[20]].any() and not out[rows[30]].any() and out[rows[40]].all() and out[rows[9]].all()


def test_decode_steps_accumulate_in_the_pool():
    """Two sequences decoding step by step through one pool (one sharing the other's prefix block)."""
    spec = _spec(2, 8, 2, 16, 16, None, "float16", num_blocks=16, max_blocks=4)
    rng = np.random.default_rng(5)
    inputs, _ = _batch(spec, rng, [(16, 1), (16, 1)], 0, [(0, 1)], reserve=19)
    cache = inputs[5]
    for step in range(20):
        inputs[3] = inputs[3] + (step > 0)
        q, k, v = (rng.standard_normal(a.shape).astype(np.float32) for a in inputs[:3])
        step_inputs = [q, k, v, inputs[3], inputs[4], cache]
        expect, expect_cache, _ = _reference(spec, *step_inputs, None)
        out = np.zeros_like(q)
        call_kernel(spec, step_inputs, [out])
        np.testing.assert_allclose(out, expect, rtol=TOL, atol=TOL)
        np.testing.assert_array_equal(cache.view(np.uint16), expect_cache.view(np.uint16))


def test_spec_names_and_validation():
    a = PagedAttentionSpec(16, 9, 3, 64, 16, 256, 64, 0.125, None, "int8")
    fields = a.__dict__
    changes = [{"rows": 1}, {"heads": 6}, {"head_dim": 32}, {"block_size": 32}, {"num_blocks": 128},
               {"max_blocks": 32}, {"scale": 0.1}, {"sliding_window": 8}, {"kv_dtype": "float16"}]
    names = {a.name} | {PagedAttentionSpec(**{**fields, **c}).name for c in changes}
    assert len(names) == 10 and all(n.isidentifier() for n in names)
    assert 1 <= heads_per_task(a, host_target()) <= 3  # query heads of one kv head sharing a task
    for dtype in DTYPES:
        spec = PagedAttentionSpec(**{**fields, "kv_dtype": dtype})
        func = spec.prim_func(host_target())
        assert func.attrs["global_symbol"] == spec.name
        assert tuple(p.name for p in func.params) == spec.arg_names
        assert ("scales" in spec.arg_names) == (dtype == "int8")
    for bad in ({"kv_heads": 4}, {"block_size": 24}, {"block_size": 0}, {"sliding_window": 0},
                {"scale": float("nan")}, {"kv_dtype": "bfloat16"}, {"num_blocks": 1 << 20}):
        with pytest.raises(BitsmithError):
            PagedAttentionSpec(**{**fields, **bad})


def test_ring_of_blocks_matches_full_history():
    check_ring(lambda spec, inputs, out: (call_kernel(spec, inputs, [out]), out)[1])


def check_ring(call):
    """`call(spec, inputs, out)` -> out, updating the pool (inputs[5]) in place. Windowed layers on a ring of blocks (entry i % ring_blocks): two sequences prefilled in chunks as long as
    the call's rows, then decoded far past the ring's span, against numpy attention over their whole history.
    The ring is the smallest `ring_blocks_needed` allows (a chunk's writes never clobber keys its first
    query still reads); one block less is refused."""
    rows, bs, window, d = 16, 8, 12, 16
    ring = ring_blocks_needed(window, rows, bs)
    assert ring == (window + rows - 2) // bs + 2 == 5
    with pytest.raises(BitsmithError, match="ring"):
        PagedAttentionSpec(rows, 4, 2, d, bs, 2 * ring, 16, 0.25, window, "float32", 0.7, ring - 1)
    spec = PagedAttentionSpec(rows, 4, 2, d, bs, 2 * ring, 16, 0.25, window, "float32", 0.7, ring)
    rng = np.random.default_rng(7)
    pool = np.full((2 * ring, 2, bs, 2, d), np.nan, np.float32)
    tables = [np.arange(ring, dtype=np.int32)[::-1].copy(), np.arange(ring, 2 * ring, dtype=np.int32)]
    history = [np.zeros((1, 2, 16 * bs, 2, d), np.float32) for _ in tables]  # the oracle's contiguous caches
    attrs = {"layer": 0, "scale": spec.scale, "sliding_window": window, "softcap": spec.softcap}
    done = [0, 0]
    # (tokens of sequence 0, tokens of sequence 1) per call: long prefill chunks at odd offsets, then decode
    for counts in [(16, 0), (0, 13), (11, 5), (16, 0), (3, 13)] + [(1, 1)] * 60:
        positions = np.full(rows, -1, np.int64)
        block_tables = np.full((rows, ring), -1, np.int32)
        owner, row = [], 0
        for i, n in enumerate(counts):
            positions[row:row + n] = np.arange(done[i], done[i] + n)
            block_tables[row:row + n] = tables[i]
            owner += [i] * n
            row += n
        q = rng.standard_normal((rows, 4, d)).astype(np.float32)
        k, v = (rng.standard_normal((rows, 2, d)).astype(np.float32) for _ in range(2))
        out = call(spec, [q, k, v, positions, block_tables, pool], np.full((rows, 4, d), np.nan, np.float32))
        row = 0
        for i, n in enumerate(counts):
            if n:
                sl = slice(row, row + n)
                expect, _ = _attention_ref([q[sl], k[sl], v[sl], positions[sl], history[i]], attrs, None)
                np.testing.assert_allclose(out[sl], expect, rtol=TOL, atol=TOL, err_msg=f"sequence {i} at {done[i]}")
            done[i] += n
            row += n
        assert not out[row:].any()
    assert done[0] > 2 * ring * bs  # the ring wrapped more than twice


def test_int4_codes_round_half_to_even_in_nibble_order():
    """int4: (x - min) / step ties round half to even, element 2j sits in the low nibble of byte j, a constant
    row stores step 1, its value as the minimum and codes 0; an odd head_dim is refused."""
    spec = _spec(2, 4, 2, 16, 16, None, "int4", num_blocks=4, max_blocks=2)
    inputs, pool32 = _batch(spec, np.random.default_rng(3), [(5, 1), (0, 1)], 0)
    ties = np.array([0, 15, 0.5, 1.5, 2.5, 14.5, 3, 7.5, 8.5, 1, 2, 3, 4, 5, 6, 13.5], np.float32)
    inputs[1][:, 0] = ties  # min 0, max 15: step exactly 1
    inputs[2][:, 0] = ties / 2 - 3  # min -3, step 0.5: the same codes
    inputs[1][:, 1] = 2.5
    _check(spec, inputs, pool32)
    args = [a.copy() for a in inputs]
    call_kernel(spec, args, [np.zeros((2, 4, 16), np.float32)])
    block = inputs[4][int(np.argmax(inputs[3] == 5)), 0]
    expect = [0, 15, 0, 2, 2, 14, 3, 8, 8, 1, 2, 3, 4, 5, 6, 14]
    assert list(unpack_int4(args[5][block, 0, 5, 0])) == expect and args[5][block, 0, 5, 0, 0] == 15 << 4
    assert list(unpack_int4(args[5][block, 1, 5, 0])) == expect and list(args[6][block, 1, 5, 0]) == [0.5, -3]
    assert list(args[6][block, 0, 5, 1]) == [1, 2.5] and not args[5][block, 0, 5, 1].any()
    assert spec.arg_names[-2:] == ("scales", "out") and spec.name.endswith("_i4")
    with pytest.raises(BitsmithError, match="int4 KV with head_dim 15"):
        _spec(1, 4, 2, 15, 16, None, "int4")
