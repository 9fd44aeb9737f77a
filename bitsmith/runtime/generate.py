"""The single-sequence generation loop: prefill the prompt, then decode until EOS or max_tokens."""

from __future__ import annotations

from typing import Iterator, Protocol

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.constrained import Guide
from bitsmith.runtime.sampling import SamplingParams, sample_token


class Session(Protocol):
    max_context: int

    def prefill(self, tokens: list[int]) -> np.ndarray: ...  # logits [len(tokens), vocab]

    def prefill_last(self, tokens: list[int]) -> np.ndarray: ...  # logits [vocab] after the last token

    def decode(self, token: int) -> np.ndarray: ...  # logits [vocab]


def generate(session: Session, prompt: list[int], max_tokens: int, params: SamplingParams,
             stop_ids: tuple[int, ...] = (), guide: Guide | None = None) -> Iterator[int]:
    """Yield generated token ids one at a time; a stop id ends the stream (and is not yielded); `guide` masks each
    step's logits to its constraint and ends the stream when the grammar is complete."""
    if not prompt:
        raise BitsmithError("the prompt encodes to no tokens", fix="pass a non-empty prompt or a model that adds BOS")
    if max_tokens < 0:
        raise BitsmithError(f"max_tokens {max_tokens} is negative", fix="pass --max-tokens 0 or more")
    if len(prompt) + max_tokens > session.max_context:
        raise BitsmithError(f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the context of "
                            f"{session.max_context}", fix="shorten the prompt or lower --max-tokens")
    if max_tokens == 0:
        return
    rng = np.random.default_rng(params.seed)
    logits = session.prefill_last(prompt)
    for step in range(max_tokens):
        token = sample_token(logits if guide is None else guide.mask(logits), params, rng)
        ended = guide is not None and guide.consume(token)
        if token in stop_ids or (ended and token in guide.constrainer.eos_ids):
            return
        yield token
        if ended:
            return
        if step + 1 < max_tokens:
            logits = session.decode(token)
