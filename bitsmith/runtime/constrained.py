"""Constrained decoding: the output must match a JSON schema, any JSON object, a regex or a grammar (llguidance masks)."""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError

# Why llguidance (imported lazily: the runtime runs without it until a request asks for a constraint): xgrammar's
# wheel requires torch, transformers and triton, which the runtime may not import; outlines-core compiles a full DFA
# index per schema up front; llguidance computes each mask lazily per step (tens of microseconds per sequence),
# reads a HF tokenizer.json as it is, fills a whole batch's bitmasks in one call on its own threads, and is what
# vLLM and llama.cpp ship.

# JSON as json.dumps writes it ("a": 1, "b": 2) with no other whitespace: flexible whitespace lets a weak or
# quantized model pad a value with spaces and newlines until max_tokens; a schema's "x-guidance" overrides it
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

CONSTRAINT_KINDS = ("json_object", "json_schema", "regex", "lark")


@dataclass(frozen=True)
class Constraint:
    """kind: json_object (any JSON object) | json_schema (spec: the schema as JSON text) | regex (spec: the
    pattern the whole output matches) | lark (spec: a llguidance Lark grammar)."""

    kind: str
    spec: str = ""

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINT_KINDS:
            raise BitsmithError(f"unknown constraint kind {self.kind!r}", where="constrained decoding",
                                fix=f"use one of {', '.join(CONSTRAINT_KINDS)}")
        if self.kind != "json_object" and not self.spec:
            raise BitsmithError(f"a {self.kind} constraint needs its {self.kind.replace('_', ' ')} text",
                                where="constrained decoding", fix="pass the schema, pattern or grammar")


@dataclass(eq=False)
class ConstraintState:
    """One sequence's grammar matcher (llguidance.LLMatcher) and, once it failed, why."""

    matcher: Any
    error: str | None = None


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.numpy  # fill_next_token_bitmask_par
    except ImportError as exc:
        raise BitsmithError("constrained decoding needs the llguidance package (pip install llguidance)",
                            where="constrained decoding",
                            fix="pip install llguidance") from exc
    return llguidance


_LL_TOKENIZERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer: Any) -> Any:
    """The llguidance tokenizer of a runtime tokenizer, built once per tokenizer object (~0.2 s for 49k tokens)."""
    if tokenizer is None:
        raise BitsmithError("constrained decoding needs the artifact's tokenizer", where="constrained decoding",
                            fix="compile the artifact with its tokenizer")
    if tokenizer in _LL_TOKENIZERS:
        return _LL_TOKENIZERS[tokenizer]
    ll = _llguidance()
    eos = list(tokenizer.eos_token_ids) or None
    try:
        if hasattr(tokenizer, "to_json"):  # runtime/tokenizer.HFTokenizer: llguidance reads tokenizer.json itself
            built = ll.LLTokenizer(tokenizer.to_json(), eos_token=eos)
        elif hasattr(tokenizer, "pieces"):  # llama2.c: each id's bytes as run.c decodes them
            built = ll.LLTokenizer(ll.TokenizerWrapper(_PiecesTokenizer(tokenizer)), eos_token=eos)
        else:
            raise BitsmithError(f"constrained decoding cannot read a {type(tokenizer).__name__}",
                                where="constrained decoding", fix="use an artifact with a HF or llama2.c tokenizer")
    except (ValueError, RuntimeError) as exc:  # llguidance's own errors for a tokenizer it cannot map to bytes
        raise BitsmithError(f"llguidance cannot use this tokenizer: {exc}", where="constrained decoding",
                            fix="use an artifact with a byte-level BPE or sentencepiece tokenizer") from exc
    _LL_TOKENIZERS[tokenizer] = built
    return built


class _PiecesTokenizer:
    """What llguidance.TokenizerWrapper reads from a llama2.c tokenizer: byte strings per id and an encoder."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        special = {tokenizer.bos_token_id, *tokenizer.eos_token_ids} - {None}
        self.special_token_ids = sorted(special)
        self.tokens = [b"" if i in special else _piece_bytes(piece) for i, piece in enumerate(tokenizer.pieces)]

    def __call__(self, text: str) -> list[int]:
        # llguidance tokenizes text forced mid-output: run.c's encode would put a space before it
        return self._tok.encode_inner(text)


def _piece_bytes(piece: bytes) -> bytes:
    match = re.fullmatch(rb"<0x([0-9A-Fa-f]{2})>", piece)
    return bytes([int(match.group(1), 16)]) if match else piece


def grammar_text(constraint: Constraint) -> str:
    """The constraint as a llguidance grammar (json_object: the schema {"type": "object"})."""
    ll = _llguidance()
    if constraint.kind in ("json_object", "json_schema"):
        try:
            schema = json.loads(constraint.spec) if constraint.kind == "json_schema" else {"type": "object"}
        except json.JSONDecodeError as exc:
            raise BitsmithError(f"the JSON schema is not JSON: {exc}", where="constrained decoding",
                                fix="pass the schema as a JSON object") from exc
        if not isinstance(schema, dict):
            raise BitsmithError("the JSON schema is not an object", where="constrained decoding",
                                fix="pass the schema as a JSON object")
        return ll.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_LAYOUT)
    return ll.grammar_from(constraint.kind, constraint.spec)


class Constrainer:
    """Grammar matchers for one tokenizer; `mask` fills every constrained row's bitmask of a step in one call."""

    def __init__(self, tokenizer: Any) -> None:
        self.ll = _llguidance()
        self.tokenizer = ll_tokenizer(tokenizer)
        self.vocab = int(self.tokenizer.vocab_size)
        self.eos_ids = frozenset(self.tokenizer.eos_tokens)
        self.executor = self.ll.LLExecutor()

    def start(self, constraint: Constraint) -> ConstraintState:
        """A fresh matcher; a schema, regex or grammar llguidance rejects is a BitsmithError."""
        matcher = self.ll.LLMatcher(self.tokenizer, grammar_text(constraint), log_level=0)
        if matcher.is_error():
            raise BitsmithError(f"invalid {constraint.kind.replace('_', ' ')}: {matcher.get_error()}",
                                where="constrained decoding", fix="fix the schema, pattern or grammar")
        return ConstraintState(matcher)

    def allowed(self, states: list[ConstraintState], vocab: int) -> np.ndarray:
        """bool [len(states), vocab]: the tokens each matcher allows next (ids past the tokenizer's: never)."""
        bitmask = np.zeros((len(states), (self.vocab + 31) // 32), dtype=np.int32)
        self.ll.numpy.fill_next_token_bitmask_par(self.executor, [(s.matcher, i) for i, s in enumerate(states)],
                                                  bitmask)
        bits = np.unpackbits(bitmask.view(np.uint8), axis=1, bitorder="little").view(bool)
        out = np.zeros((len(states), vocab), dtype=bool)
        n = min(vocab, self.vocab)
        out[:, :n] = bits[:, :n]
        return out

    def mask(self, states: list[ConstraintState], logits: np.ndarray) -> np.ndarray:
        """logits [len(states), vocab] with every token the matchers forbid at -inf; a matcher in error or with
        no allowed token gets its `error` set (the caller ends that sequence)."""
        allowed = self.allowed(states, logits.shape[1])
        for state, row in zip(states, allowed):
            if state.matcher.is_error():
                state.error = state.matcher.get_error()
            elif not row.any():
                state.error = "the grammar allows no token of the model's vocabulary here"
        return np.where(allowed, logits, np.float32(-np.inf)).astype(logits.dtype, copy=False)

    def consume(self, state: ConstraintState, token: int) -> bool:
        """Advance the matcher by the sampled token; True when the grammar is complete (stopped)."""
        if not state.matcher.consume_token(int(token)):
            state.error = state.matcher.get_error() or f"the grammar rejected token {token}"
            return False
        return bool(state.matcher.is_stopped())


class Guide:
    """One sequence's constraint in the single-sequence loop (runtime/generate.py), on the engine's mask code."""

    def __init__(self, tokenizer: Any, constraint: Constraint) -> None:
        self.constrainer = Constrainer(tokenizer)
        self.state = self.constrainer.start(constraint)

    def _check(self) -> None:
        if self.state.error:
            raise BitsmithError(f"constrained decoding stopped: {self.state.error}", where="constrained decoding",
                                fix="check the schema or pattern (the model's vocabulary cannot continue it)")

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """logits [vocab] with the tokens the grammar forbids next at -inf."""
        out = self.constrainer.mask([self.state], logits[None])[0]
        self._check()
        return out

    def consume(self, token: int) -> bool:
        """Advance by the sampled token; True when the grammar is complete."""
        ended = self.constrainer.consume(self.state, token)
        self._check()
        return ended
