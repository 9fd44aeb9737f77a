"""The GGUF block codec against gguf-py: decode then dequantize gives gguf.quants.dequantize's float32 bits, and
encode(decode(bytes)) gives the bytes back, for every exactly-mapped type, on random blocks and on a real file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from bitsmith.compiler.gguf_blocks import (
    GGUF_SCHEMES,
    decode,
    encode,
    gguf_kind,
    row_bytes,
)
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight, dequantize, parse_scheme

SMOLLM2_Q4_1 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
# byte offsets of each type's float16 fields inside a block (random bytes there may be NaN/inf: made finite for
# the float comparison; the byte round trip uses the raw random bytes, NaNs included)
F16_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "Q2_K": (80, 82),
              "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def random_rows(kind: str, rows: int, blocks: int, seed: int, finite: bool) -> np.ndarray:
    _, size = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows * blocks, size), dtype=np.uint8)
    if finite:
        for at in F16_FIELDS[kind]:
            data[:, at:at + 2] = rng.normal(0, 0.05, size=(rows * blocks, 1)).astype(np.float16).view(np.uint8)
    return data.reshape(rows, blocks * size)


def test_every_mapped_type_is_listed_with_its_scheme():
    assert set(GGUF_SCHEMES) == set(F16_FIELDS)
    assert GGUF_SCHEMES["Q4_K"] == parse_scheme("int4-g32-min-s256-imported")
    assert GGUF_SCHEMES["Q6_K"] == parse_scheme("int6-g16-sym-s256-imported")
    assert GGUF_SCHEMES["Q3_K"] == parse_scheme("int3-g16-sym-s256-imported")
    assert GGUF_SCHEMES["Q2_K"] == parse_scheme("int2-g16-min-s256-imported")
    assert GGUF_SCHEMES["Q4_1"] == parse_scheme("int4-g32-min-imported")
    assert GGUF_SCHEMES["Q8_0"] == parse_scheme("int8-g32-sym-imported")
    for kind, scheme in GGUF_SCHEMES.items():
        assert gguf_kind(scheme) == kind
    assert gguf_kind(parse_scheme("int4-g32-asym")) is None  # fp16 zero points: no GGUF type
    assert gguf_kind(parse_scheme("int4-g128-sym")) is None  # groups of 128: only by repeating scales (export)


@pytest.mark.parametrize("kind", sorted(GGUF_SCHEMES))
def test_random_blocks_decode_like_gguf_py_and_encode_back(kind):
    block, _ = GGML_QUANT_SIZES[GGMLQuantizationType[kind]]
    rows, blocks = 6, 3
    raw = random_rows(kind, rows, blocks, seed=1, finite=False)
    assert np.array_equal(encode(decode(kind, raw, blocks * block)), raw)  # every bit pattern, NaN scales too

    data = random_rows(kind, rows, blocks, seed=2, finite=True)
    qw = decode(kind, data, blocks * block)
    assert qw.scheme == GGUF_SCHEMES[kind] and qw.q.shape == (rows, blocks * block)
    assert int(qw.q.max()) <= qw.scheme.qmax
    ours = dequantize(qw)
    ref = np.asarray(gguf_dequantize(data, GGMLQuantizationType[kind]), dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), np.abs(ours - ref).max()
    assert np.array_equal(encode(qw), data)


def test_field_values_are_the_documented_ones():
    """One hand-built Q4_K block: d = 0.5, dmin = 0.25, sub-block 5 has scale 37 and min 50 (packed into the
    high bits of bytes 1 and 5 and byte 9), element 32*5 + 3 is code 11."""
    from bitsmith.compiler.gguf_blocks import _pack_k_scales

    sc, mn = np.zeros((1, 8), np.int8), np.zeros((1, 8), np.int8)
    sc[0, 5], mn[0, 5] = 37, 50
    codes = np.zeros(256, np.uint8)
    codes[5 * 32 + 3] = 11
    qs = np.zeros(128, np.uint8)
    qs[2 * 32 + 3] = 11 << 4  # sub-block 5 = high nibbles of qs[64:96]
    block = np.concatenate([np.array([0.5, 0.25], np.float16).view(np.uint8), _pack_k_scales(sc, mn)[0], qs])
    qw = decode("Q4_K", block[None], 256)
    assert qw.q[0, 163] == 11 and qw.scales[0, 5] == 37 and qw.zeros[0, 5] == 50
    assert qw.super_scales[0, 0] == np.float16(0.5) and qw.super_zeros[0, 0] == np.float16(-0.25)
    w = dequantize(qw)
    assert w[0, 163] == np.float32(0.5 * 37 * 11 - 0.25 * 50) and w[0, 160] == np.float32(-0.25 * 50)


def test_encode_refuses_what_no_type_holds():
    q = np.zeros((2, 256), np.uint8)
    asym = QuantizedWeight(q, np.ones((2, 8), np.float16), np.ones((2, 8), np.float16),
                           parse_scheme("int4-g32-asym"), 256)
    with pytest.raises(BitsmithError, match="no GGUF type holds scheme int4-g32-asym"):
        encode(asym)
    k4 = decode("Q4_K", random_rows("Q4_K", 2, 1, seed=3, finite=True), 256)
    too_big = QuantizedWeight(k4.q, np.full((2, 8), 64, np.int8), k4.zeros, k4.scheme, 256, k4.super_scales,
                              k4.super_zeros)
    with pytest.raises(BitsmithError, match=r"scales codes outside Q4_K's \[0, 63\]"):
        encode(too_big)
    with pytest.raises(BitsmithError, match="does not hold"):
        decode("Q4_0", np.zeros((2, 17), np.uint8), 32)
    with pytest.raises(BitsmithError, match="IQ4_NL.*no exact scheme"):
        decode("IQ4_NL", np.zeros((2, 18), np.uint8), 32)
    assert row_bytes("Q6_K", 512) == 420


@pytest.mark.slow
@pytest.mark.skipif(not SMOLLM2_Q4_1.exists(), reason=f"no SmolLM2 Q4_1 GGUF at {SMOLLM2_Q4_1}")
def test_real_file_tensors_round_trip():
    """SmolLM2-135M Q4_1 (Q4_1 matrices, its tied embedding Q8_0): bit-exact both ways, on the embedding and the
    first and last layers (the K-quants on real files: test_gguf_import.py's llama_model_quantize outputs)."""
    reader = GGUFReader(SMOLLM2_Q4_1)
    seen = set()
    for tensor in reader.tensors:
        kind = tensor.tensor_type.name
        wanted = tensor.name.startswith(("token_embd", "blk.0.", "blk.29."))
        if kind not in GGUF_SCHEMES or len(tensor.shape) != 2 or not wanted:
            continue
        seen.add(kind)
        data = np.asarray(tensor.data)
        qw = decode(kind, data, int(tensor.shape[0]))
        ref = np.asarray(gguf_dequantize(data, tensor.tensor_type), dtype=np.float32)
        assert np.array_equal(dequantize(qw).view(np.uint32), ref.view(np.uint32)), tensor.name
        assert np.array_equal(encode(qw), data), tensor.name
    assert seen == {"Q4_1", "Q8_0"}
