"""Bit packing: exact round trips, the documented layout (checked bit by bit), and storage size."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import pack
from bitsmith.runtime.packed_layout import packed_bytes, packed_shape, unpack
from bitsmith.runtime.quant_scheme import QuantScheme, theoretical_bytes

SHAPES = [(7, 37), (3, 576), (1, 1), (2, 1000), (4, 512), (3, 33), (2, 2049)]


def _reference_pack(q: np.ndarray, bits: int) -> np.ndarray:
    """The module docstring's formulas with Python big ints: lane streams, 16 lanes, narrow tail."""
    units, slots = (1, 32 // bits) if 32 % bits == 0 else (bits, 32)
    rows = []
    for row in q.tolist():
        words, base = [], 0
        while base < len(row):
            lanes = 16 if len(row) - base >= 16 * slots else -(-(len(row) - base) // slots)
            streams = [0] * lanes
            for j in range(slots):
                for lane in range(lanes):
                    k = base + j * lanes + lane
                    if k < len(row):
                        streams[lane] |= row[k] << (j * bits)
            for p in range(units):  # word base_w + p*lanes + lane
                words += [(streams[lane] >> (32 * p)) & 0xFFFFFFFF for lane in range(lanes)]
            base += lanes * slots
        rows.append(words)
    return np.array(rows, dtype=np.uint32)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_round_trip_and_reference_layout(bits, shape):
    rng = np.random.default_rng(bits * 1000 + shape[1])
    q = rng.integers(0, 2 ** bits, size=shape, dtype=np.uint8)
    words = pack(q, bits)
    assert words.dtype == np.uint32 and words.shape == packed_shape(*shape, bits)
    np.testing.assert_array_equal(words, _reference_pack(q, bits))
    np.testing.assert_array_equal(unpack(words, bits, shape[1]), q)


def test_four_bit_layout_is_the_perf_notes_layout():
    # "uint32 word kb*16 + l holds nibble j of element k = kb*128 + j*16 + l"
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, size=(2, 384), dtype=np.uint8)
    words = pack(q, 4)
    for kb in range(3):
        for j in range(8):
            for lane in range(16):
                nibble = (words[:, kb * 16 + lane] >> (4 * j)) & 0xF
                np.testing.assert_array_equal(nibble, q[:, kb * 128 + j * 16 + lane])


def test_three_bit_values_straddle_words():
    q = np.zeros((1, 512), np.uint8)
    q[0, 10 * 16] = 0b111  # lane 0, slot 10: bits 30..32 of lane 0's stream
    words = pack(q, 3)
    assert words[0, 0] == 0b11 << 30 and words[0, 16] == 0b1
    assert np.count_nonzero(words) == 2


@pytest.mark.parametrize("bits, slot", [(5, 6), (6, 5)])
def test_five_and_six_bit_values_straddle_words(bits, slot):
    """Slot 6 at 5 bits (bits 30..34) and slot 5 at 6 bits (bits 30..35): the low 2 bits end word p = 0."""
    q = np.zeros((1, 512), np.uint8)
    q[0, slot * 16 + 3] = (1 << bits) - 1  # lane 3
    words = pack(q, bits)
    assert words[0, 3] == 0b11 << 30 and words[0, 16 + 3] == (1 << (bits - 2)) - 1
    assert np.count_nonzero(words) == 2
    np.testing.assert_array_equal(unpack(words, bits, 512), q)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(576, 1536), (1536, 576), (576, 576), (192, 576), (128, 384),
                                   (4096, 11008), (2048, 5632), (151936, 896), (49152, 576)])
def test_storage_within_two_percent(bits, shape):
    ideal = bits * shape[0] * shape[1] / 8
    assert packed_bytes(*shape, bits) <= ideal * 1.02
    scheme = QuantScheme(bits, 128, False, "rtn")  # codes + fp16 scales and zeros
    artifact = packed_bytes(*shape, bits) + 4 * shape[0] * scheme.n_groups(shape[1])
    assert artifact <= theoretical_bytes(*shape, scheme) * 1.02


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_real_size_pack(bits):
    q = np.random.default_rng(bits).integers(0, 2 ** bits, size=(576, 1536), dtype=np.uint8)
    words = pack(q, bits)
    assert words.nbytes == bits * q.size // 8
    np.testing.assert_array_equal(unpack(words, bits, 1536), q)


def test_errors():
    with pytest.raises(BitsmithError, match="does not fit in 2 bits"):
        pack(np.full((1, 8), 4, np.uint8), 2)
    with pytest.raises(BitsmithError, match="7-bit"):
        pack(np.zeros((1, 8), np.uint8), 7)
    with pytest.raises(BitsmithError, match="expected uint32"):
        unpack(np.zeros((1, 3), np.uint32), 4, 64)
