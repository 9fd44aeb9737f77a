"""Calibration tokens: from a user's text or JSONL file (or the built-in default text), cut into samples."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path

import numpy as np

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.errors import BitsmithError
from bitsmith.runtime.tokenizer import tokenizer_from_spec


@dataclass(frozen=True)
class CalibrationOptions:
    path: str | None = None  # None: the built-in default text (bitsmith/data/calibration.txt)
    samples: int = 32
    seqlen: int = 256
    seed: int = 0


def read_calibration_text(path: str | None) -> str:
    """Plain text, or JSONL whose lines carry a `text` field."""
    if path is None:
        return resources.files("bitsmith").joinpath("data/calibration.txt").read_text(encoding="utf-8")
    file = Path(path)
    if not file.is_file():
        raise BitsmithError(f"calibration file {path!r} does not exist", fix="check the --calib path")
    raw = file.read_text(encoding="utf-8", errors="replace")
    if file.suffix == ".jsonl":
        texts = []
        for number, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BitsmithError(f"line {number} is not JSON: {exc}", where=path,
                                    fix="JSONL needs one object with a 'text' field per line") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise BitsmithError(f"line {number} has no string 'text' field", where=path,
                                    fix="JSONL needs one object with a 'text' field per line")
            texts.append(record["text"])
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise BitsmithError("calibration file is empty", where=path, fix="pass a file with text in it")
    return raw


def calibration_samples(token_ids: list[int], options: CalibrationOptions, bos: int | None,
                        where: str = "calibration") -> np.ndarray:
    """`samples` windows of `seqlen` tokens (int64 [samples, seqlen]), BOS first when the model uses one.

    Windows start at seeded random offsets, so a text shorter than samples x seqlen is reused rather than
    padded; a text shorter than one window is refused.
    """
    body = options.seqlen - (bos is not None)
    if len(token_ids) < body:
        raise BitsmithError(f"calibration text has {len(token_ids)} tokens, fewer than one sample of "
                            f"{options.seqlen}", where=where, fix="pass a longer --calib file or a smaller --calib-seqlen")
    rng = np.random.default_rng(options.seed)
    starts = rng.integers(0, len(token_ids) - body + 1, size=options.samples)
    prefix = [bos] if bos is not None else []
    return np.array([prefix + token_ids[s:s + body] for s in starts], dtype=np.int64)


def calibration_tokens(model: LoadedModel, options: CalibrationOptions) -> np.ndarray | None:
    """Calibration samples tokenized with the model's own tokenizer (None without a tokenizer)."""
    if model.tokenizer is None:
        return None
    tokenizer = tokenizer_from_spec(model.tokenizer)
    where = options.path or "built-in calibration text"
    ids = tokenizer.encode(read_calibration_text(options.path), add_bos=False)
    limit = int(model.config.get("max_position") or options.seqlen)
    if options.seqlen > limit:  # a sample longer than the model's positions (GPT-2's learned table) cannot run
        options = replace(options, seqlen=limit)
    return calibration_samples(ids, options, tokenizer.bos_token_id if tokenizer.add_bos else None, where)
