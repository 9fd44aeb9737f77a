"""Token log-probabilities: the model's own distribution (log_softmax of the raw logits, before temperature and mask)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs / legacy logprobs


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token: its id, its logprob, and the `top` most likely (id, logprob), most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = field(default_factory=tuple)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities over the last axis (float64 so long prompts' sums do not drift)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def top_logprobs(logprobs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    """The k most likely (id, logprob) of one row, most likely first; ties go to the smaller id."""
    if k <= 0:
        return ()
    k = min(k, logprobs.size)
    candidates = np.argpartition(-logprobs, k - 1)[:k]
    order = candidates[np.lexsort((candidates, -logprobs[candidates]))]
    return tuple((int(i), float(logprobs[i])) for i in order)


def token_logprob(logits: np.ndarray, token: int, k: int) -> TokenLogprob:
    """`token`'s logprob under one row of raw logits, plus the top k."""
    lp = log_softmax(logits)
    return TokenLogprob(int(token), float(lp[token]), top_logprobs(lp, k))
