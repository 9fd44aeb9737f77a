"""`bitsmith eval`: perplexity of an artifact and its KL divergence / top-1 agreement against a reference model."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, is_artifact, load_artifact


@dataclass(frozen=True)
class EvalResult:
    ppl: float
    ref_ppl: float | None
    kld_mean: float | None
    kld_p99: float | None
    top1_agree: float | None
    tokens: int  # scored tokens
    windows: int
    ctx: int
    bos: bool

    def to_json(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def windows_of(ids: list[int], ctx: int, bos: int | None) -> list[list[int]]:
    """Non-overlapping windows of `ctx` text tokens (a trailing partial window is dropped).

    With BOS each window is [BOS] + ctx tokens and every text token is scored; without it the first
    token of each window has no context and is not scored.
    """
    prefix = [bos] if bos is not None else []
    return [prefix + ids[start:start + ctx] for start in range(0, len(ids) - ctx + 1, ctx)]


def _window_logprobs(module: Module, weights, tokens: list[int]) -> np.ndarray:
    """log-probabilities [len(tokens) - 1, vocab] for predicting tokens[1:]."""
    session = ReferenceSession(module, weights, len(tokens))
    return log_softmax(session.prefill(tokens)[:-1])


def _reference_model(artifact: Artifact, reference: str | Path | None) -> tuple[Module, dict] | None:
    """The 16-bit model of the same source (or `reference`); None when the artifact is itself unquantized."""
    if reference is None:
        if not artifact.manifest["ir"].get("meta", {}).get("precision_plan"):
            return None
        reference = artifact.manifest["provenance"]["source"].get("path")
        if not reference or not Path(reference).exists():
            raise BitsmithError(f"the artifact's source {reference!r} is not available for the reference logits",
                                fix="pass --reference MODEL_OR_ARTIFACT")
    if is_artifact(reference):
        ref = load_artifact(reference, check_hashes=False)
        return Module.from_json(ref.manifest["ir"]), ref.weights
    from bitsmith.compiler.loader import load_model

    model = load_model(reference)
    return model.module, model.weights


def evaluate(path: str | Path, text: str, tokens: int | None, ctx: int, reference: str | Path | None = None,
             log: Callable[[str], None] | None = None) -> EvalResult:
    artifact = load_artifact(path)
    tokenizer = artifact.tokenizer()
    ids = tokenizer.encode(text, add_bos=False)
    if tokens:
        ids = ids[:tokens]
    bos = tokenizer.bos_token_id if tokenizer.add_bos else None
    if ctx + (bos is not None) > artifact.max_context:
        raise BitsmithError(f"--ctx {ctx} exceeds the model's context of {artifact.max_context}", fix="lower --ctx")
    windows = windows_of(ids, ctx, bos)
    if not windows:
        raise BitsmithError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}",
                            fix="pass a longer text or a smaller --ctx")
    module = Module.from_json(artifact.manifest["ir"])
    ref = _reference_model(artifact, reference)
    nll, ref_nll, kld, agree = [], [], [], []
    for window in tqdm(windows, desc="eval windows", leave=False, disable=len(windows) < 4):
        targets = np.asarray(window[1:])
        logp = _window_logprobs(module, artifact.weights, window)
        nll.append(-logp[np.arange(len(targets)), targets])
        if ref is not None:
            ref_logp = _window_logprobs(ref[0], ref[1], window)
            ref_nll.append(-ref_logp[np.arange(len(targets)), targets])
            kld.append((np.exp(ref_logp) * (ref_logp - logp)).sum(axis=-1))
            agree.append(ref_logp.argmax(-1) == logp.argmax(-1))
    nll_all = np.concatenate(nll)
    ppl = float(np.exp(nll_all.mean()))
    if ref is None:  # the artifact is its own reference
        return EvalResult(ppl, ppl, 0.0, 0.0, 1.0, int(nll_all.size), len(windows), ctx, bos is not None)
    kld_all = np.concatenate(kld)
    return EvalResult(
        ppl=ppl,
        ref_ppl=float(np.exp(np.concatenate(ref_nll).mean())),
        kld_mean=float(kld_all.mean()),
        kld_p99=float(np.percentile(kld_all, 99)),
        top1_agree=float(np.concatenate(agree).mean()),
        tokens=int(nll_all.size),
        windows=len(windows),
        ctx=ctx,
        bos=bos is not None,
    )
