"""llama2.c tokenizer: run.c encode/decode semantics on a tiny vocabulary, and tok512 when present."""

from __future__ import annotations

import random
import struct
from pathlib import Path

import pytest

from bitsmith.errors import BitsmithError
from bitsmith.runtime.tokenizer import load_tokenizer
from bitsmith.runtime.tokenizer_llama2c import Llama2cTokenizer, parse_tokenizer_bin

# Tiny vocabulary in llama2.c order: <unk>, BOS, EOS, 256 byte pieces, then scored pieces.
MERGED = [(b" ", -1.0), (b"a", -2.0), (b"b", -3.0), (b"ab", -4.0), (b" a", -5.0), (b" ab", -6.0),
          (b"ba", -4.0), (b"\xc3\xa9", -7.0), (b" b", -8.0), (b"abab", -0.5), (b"c", -9.0)]


def tiny_pieces() -> list[tuple[bytes, float]]:
    return ([(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
            + [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)] + MERGED)


def tok_bin(entries: list[tuple[bytes, float]]) -> bytes:
    out = struct.pack("<i", max(len(p) for p, _ in entries))
    for piece, score in entries:
        out += struct.pack("<fi", score, len(piece)) + piece
    return out


def reference_encode(pieces: list[bytes], scores: list[float], text: str, bos: bool) -> list[int]:
    """A direct transcription of run.c's quadratic encode loop (the oracle)."""
    lookup = {p: i for i, p in reversed(list(enumerate(pieces)))}
    ids = [1] if bos else []
    raw = text.encode()
    if raw:
        ids.append(lookup[b" "])
    buf = b""
    for i, byte in enumerate(raw):
        if byte & 0xC0 != 0x80:
            buf = b""
        buf += bytes([byte])
        if i + 1 < len(raw) and raw[i + 1] & 0xC0 == 0x80 and len(buf) < 4:
            continue
        ids += [lookup[buf]] if buf in lookup else [b + 3 for b in buf]
        buf = b""
    while True:
        best, best_id, best_idx = -1e10, -1, -1
        for i in range(len(ids) - 1):
            j = lookup.get(pieces[ids[i]] + pieces[ids[i + 1]], -1)
            if j != -1 and scores[j] > best:
                best, best_id, best_idx = scores[j], j, i
        if best_idx == -1:
            return ids
        ids[best_idx: best_idx + 2] = [best_id]


@pytest.fixture
def tiny() -> Llama2cTokenizer:
    pieces, scores = parse_tokenizer_bin(tok_bin(tiny_pieces()), "tiny")
    return Llama2cTokenizer(pieces, scores)


def test_parse_roundtrip(tiny):
    assert tiny.vocab_size == 3 + 256 + len(MERGED)
    assert tiny.pieces[3] == b"<0x00>" and tiny.pieces[-1] == b"c"


def test_encode_merges_by_score(tiny):
    ids = tiny.encode("abab")
    assert ids[0] == 1
    # " " + a b a b: "abab" (-0.5) needs "ab"+"ab"; "ab" (-4) beats " a" (-5), so " " stays alone
    assert [tiny.pieces[i] for i in ids[1:]] == [b" ", b"abab"]
    assert tiny.encode("", add_bos=True) == [1] and tiny.encode("", add_bos=False) == []


def test_byte_fallback_and_utf8(tiny):
    ids = tiny.encode("\n\u00e9z\u65e5", add_bos=False)
    lookup = {p: i for i, p in enumerate(tiny.pieces)}
    assert ids == [lookup[b" "], 0x0A + 3, lookup[b"\xc3\xa9"], ord("z") + 3] + [b + 3 for b in "\u65e5".encode()]


def test_encode_matches_run_c_reference(tiny):
    rng = random.Random(0)
    alphabet = ["a", "b", "c", " ", "\u00e9", "\n", "x", "\U0001f642"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))
        for bos in (True, False):
            assert tiny.encode(text, add_bos=bos) == reference_encode(tiny.pieces, tiny.scores, text, bos), text


def test_decode_bytes_and_bos_space(tiny):
    text = "ab \u00e9\n\u65e5 ba"
    assert tiny.decode(tiny.encode(text)) == text  # the dummy-prefix space after BOS is stripped
    assert tiny.decode(tiny.encode(text, add_bos=False)) == " " + text
    assert tiny.decode([0xE6 + 3]) == "\ufffd"  # a lone lead byte decodes with replacement
    with pytest.raises(BitsmithError, match="outside the vocabulary"):
        tiny.decode([10_000])


def test_load_tokenizer_dispatch(tmp_path):
    (tmp_path / "tokenizer.bin").write_bytes(tok_bin(tiny_pieces()))
    tok = load_tokenizer(tmp_path, {"kind": "llama2c", "bos_token_id": 1, "eos_token_ids": [2], "add_bos": False})
    assert isinstance(tok, Llama2cTokenizer)
    assert tok.add_bos is False and tok.eos_token_ids == (2,)
    assert tok.encode("ab")[0] != 1


@pytest.mark.parametrize("cut", [2, 9, 31, -1])  # 30 is an entry boundary: only a vocab count catches that
def test_truncated_file(tmp_path, cut):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(tok_bin(tiny_pieces())[:cut])
    with pytest.raises(BitsmithError) as info:
        Llama2cTokenizer.from_file(path, {})
    assert str(path) in str(info.value)


def test_nonsense_header(tmp_path):
    path = tmp_path / "tokenizer.bin"
    path.write_bytes(struct.pack("<i", -5) + b"\0" * 20)
    with pytest.raises(BitsmithError, match="max_token_length"):
        Llama2cTokenizer.from_file(path, {})


def test_tok512(shared_data: Path):
    tok = Llama2cTokenizer.from_file(shared_data / "stories260k" / "tok512.bin", {})
    assert tok.vocab_size == 512
    ids = tok.encode("Once upon a time")
    assert ids == [1, 403, 407, 261, 378]
    assert tok.decode(ids) == "Once upon a time"
    assert 13 in tok.encode("a\nb")  # newline has no piece: byte token <0x0A>


def test_tok512_matches_reference_on_stories(shared_data: Path):
    tok = Llama2cTokenizer.from_file(shared_data / "stories260k" / "tok512.bin", {})
    text_path = shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt"
    if not text_path.is_file():
        pytest.skip(f"{text_path} not found")
    lines = [line for line in text_path.read_text().splitlines() if line][:40]
    for line in lines:
        ids = tok.encode(line)
        assert ids == reference_encode(tok.pieces, tok.scores, line, True)
        assert tok.decode(ids) == line
