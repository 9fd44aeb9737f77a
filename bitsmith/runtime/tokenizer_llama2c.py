"""The llama2.c binary tokenizer (tok*.bin): run.c's encode (greedy score-ordered BPE) and decode."""

from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path
from typing import Any

from bitsmith.errors import BitsmithError

# tok*.bin layout (little-endian): int32 max_token_length, then per token until EOF:
#   float32 score, int32 byte length n, n bytes of the piece (sentencepiece's "▁" already a space).
# Ids 3..258 are the byte-fallback pieces "<0x00>".."<0xFF>", so byte b encodes as id b + 3.
_HEADER = struct.Struct("<i")
_ENTRY = struct.Struct("<fi")
_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")
_BYTE_OFFSET = 3
_NO_SCORE = -1e10  # run.c's initial best score: merges scoring at or below it never happen


def parse_tokenizer_bin(data: bytes, where: str) -> tuple[list[bytes], list[float]]:
    """Split a tok*.bin image into (pieces, scores); BitsmithError naming `where` if it is malformed."""
    if len(data) < _HEADER.size:
        raise BitsmithError("is not a llama2.c tokenizer: shorter than its 4-byte header", where=where,
                            fix="pass the tok*.bin written by llama2.c's tokenizer.py")
    (max_len,) = _HEADER.unpack_from(data, 0)
    if not 0 < max_len < 1 << 16:
        raise BitsmithError(f"is not a llama2.c tokenizer: max_token_length {max_len}", where=where,
                            fix="pass the tok*.bin written by llama2.c's tokenizer.py")
    pieces: list[bytes] = []
    scores: list[float] = []
    offset = _HEADER.size
    while offset < len(data):
        if offset + _ENTRY.size > len(data):
            raise _truncated(where, len(pieces))
        score, length = _ENTRY.unpack_from(data, offset)
        offset += _ENTRY.size
        if length < 0 or offset + length > len(data):
            raise _truncated(where, len(pieces))
        pieces.append(data[offset : offset + length])
        scores.append(score)
        offset += length
    if not pieces:
        raise BitsmithError("llama2.c tokenizer holds no tokens", where=where, fix="pass a complete tok*.bin")
    return pieces, scores


def _truncated(where: str, index: int) -> BitsmithError:
    return BitsmithError(f"llama2.c tokenizer is truncated or corrupt at token {index}", where=where,
                         fix="re-export or re-download the tok*.bin")


class Llama2cTokenizer:
    """Tokenizer equivalent to llama2.c run.c's `encode`/`decode` for a tok*.bin vocabulary."""

    def __init__(self, pieces: list[bytes], scores: list[float], *, bos_token_id: int | None = 1,
                 eos_token_ids: tuple[int, ...] = (2,), add_bos: bool = True):
        self.pieces = pieces
        self.scores = scores
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos
        self._lookup: dict[bytes, int] = {}
        for index, piece in enumerate(pieces):
            self._lookup.setdefault(piece, index)  # run.c's bsearch finds any duplicate; keep the first

    @classmethod
    def from_file(cls, path: str | Path, entry: dict[str, Any]) -> "Llama2cTokenizer":
        """Read tok*.bin at `path`; special ids and add_bos come from the manifest `entry`."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise BitsmithError(f"cannot read tokenizer: {exc}", where=str(path), fix="rebuild the artifact") from exc
        pieces, scores = parse_tokenizer_bin(data, str(path))
        return cls(
            pieces,
            scores,
            bos_token_id=entry.get("bos_token_id", 1),
            eos_token_ids=tuple(entry.get("eos_token_ids") or (2,)),
            add_bos=bool(entry.get("add_bos", True)),
        )

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """run.c encode: BOS, dummy-prefix " ", one id per UTF-8 char (byte fallback), then greedy merges."""
        ids: list[int] = []
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            ids.append(self.bos_token_id)
        raw = text.encode("utf-8", errors="replace")
        if raw:
            ids.append(self._id_or_bytes(b" ")[0])
        ids.extend(self._char_ids(raw))
        return self._merge(ids)

    def encode_inner(self, text: str) -> list[int]:
        """Ids of `text` as a piece inside a sequence: no BOS and no dummy-prefix space (constrained decoding's
        forced text)."""
        return self._merge(self._char_ids(text.encode("utf-8", errors="replace")))

    def _id_or_bytes(self, piece: bytes) -> list[int]:
        """The piece's id, or its bytes as byte-fallback ids."""
        index = self._lookup.get(piece)
        return [index] if index is not None else [b + _BYTE_OFFSET for b in piece]

    def _char_ids(self, raw: bytes) -> list[int]:
        """Group bytes as run.c does (a lead byte plus at most 3 continuation bytes) and look each group up."""
        ids: list[int] = []
        start = 0
        for i in range(len(raw)):
            length = i - start + 1
            if (raw[i] & 0xC0) != 0x80:  # a lead byte starts a new group
                start, length = i, 1
            nxt = raw[i + 1] if i + 1 < len(raw) else 0
            if (nxt & 0xC0) == 0x80 and length < 4:
                continue
            ids.extend(self._id_or_bytes(raw[start : i + 1]))
            start = i + 1
        return ids

    def _merge(self, ids: list[int]) -> list[int]:
        """Repeatedly merge the adjacent pair whose concatenation scores highest (leftmost on ties).

        Same result as run.c's quadratic loop: a heap keyed by (-score, position) over a linked list;
        positions keep their order after merges, so the leftmost-on-ties rule is preserved.
        """
        n = len(ids)
        tokens = list(ids)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        alive = [True] * n
        heap: list[tuple[float, int, int, int]] = []

        def push(i: int) -> None:
            j = nxt[i]
            if j >= n:
                return
            merged = self._lookup.get(self.pieces[tokens[i]] + self.pieces[tokens[j]])
            if merged is not None and self.scores[merged] > _NO_SCORE:
                heapq.heappush(heap, (-self.scores[merged], i, tokens[i], tokens[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, left, right = heapq.heappop(heap)
            j = nxt[i] if alive[i] else n
            if j >= n or tokens[i] != left or tokens[j] != right:
                continue  # stale entry: the pair changed since it was pushed
            tokens[i] = self._lookup[self.pieces[left] + self.pieces[right]]
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prv[nxt[j]] = i
            if prv[i] >= 0:
                push(prv[i])
            push(i)
        return [tokens[i] for i in range(n) if alive[i]]

    def decode(self, ids: list[int]) -> str:
        """run.c decode: byte pieces become raw bytes; a piece right after BOS loses its leading space.

        BOS and EOS print nothing (run.c never prints them); bytes decode as UTF-8 with replacement.
        """
        out = bytearray()
        prev: int | None = None
        for token in ids:
            token = int(token)
            if not 0 <= token < len(self.pieces):
                raise BitsmithError(f"token id {token} is outside the vocabulary of {len(self.pieces)}",
                                    where="llama2.c tokenizer", fix="check the model's vocab_size")
            if token == self.bos_token_id or token in self.eos_token_ids:
                prev = token
                continue
            piece = self.pieces[token]
            if prev is not None and prev == self.bos_token_id and piece[:1] == b" ":
                piece = piece[1:]
            byte = _BYTE_PIECE.fullmatch(piece)
            out += bytes([int(byte.group(1), 16)]) if byte else piece
            prev = token
        return out.decode("utf-8", errors="replace")
