"""The `needle` suite: a fact hidden at several depths of a filler text at several context lengths; the share
of greedy answers that retrieve it, per depth x length, artifact and reference."""

from __future__ import annotations

import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable

from bitsmith.errors import BitsmithError
from bitsmith.runtime.tokenizer import Tokenizer, render_chat
from bitsmith.tools.suites import SUITES, SuiteOptions, SuiteResult
from bitsmith.tools.suites.generate import Generator
from bitsmith.tools.suites.reference import resolve_reference

# (fact, question, answer): several per cell so a cell's accuracy is not a single coin
NEEDLES = (
    ("The secret code of the blue door is 4817.", "What is the secret code of the blue door?", "4817"),
    ("The name of the captain's cat is Pumpernickel.", "What is the name of the captain's cat?", "Pumpernickel"),
    ("The key to the garden shed is hidden under the red flowerpot.",
     "Where is the key to the garden shed hidden?", "flowerpot"),
)
INSTRUCTION = "Read the text below, then answer the question at the end.\n\n"
ANSWER_TOKENS = 16
MARK = "\u0001FILLER\u0001"


@dataclass(frozen=True)
class NeedlePrompt:
    ids: list[int]
    fact_at: int  # index in `ids` of the fact's first token
    filler_start: int  # index of the first filler token
    filler_tokens: int  # filler tokens around the fact
    answer: str
    length: int
    depth: float


def default_lengths(max_context: int) -> tuple[int, ...]:
    """Powers of two from 256 up to the context (the context itself when it is below 256)."""
    lengths, n = [], 256
    while n <= max_context:
        lengths.append(n)
        n *= 2
    return tuple(lengths) or (max_context,)


def filler_ids(tokenizer: Tokenizer, tokens: int) -> list[int]:
    """The held-out text (bitsmith/data/eval.txt), repeated as needed, as `tokens` token ids."""
    text = (resources.files("bitsmith") / "data" / "eval.txt").read_text(encoding="utf-8")
    piece = tokenizer.encode(text, add_bos=False)
    ids: list[int] = []
    while len(ids) < tokens:
        ids += piece
    return ids[:tokens]


def sentence_ends(tokenizer: Tokenizer, ids: list[int]) -> list[int]:
    """Positions p where ids[:p] ends a sentence (a token ending in '.', '!' or '?'), so the fact starts a sentence."""
    return [p + 1 for p, t in enumerate(ids) if tokenizer.decode([t]).rstrip().endswith((".", "!", "?"))]


def build_prompt(gen: Generator, length: int, depth: float, needle: tuple[str, str, str]) -> NeedlePrompt:
    """A prompt of about `length` tokens (answer room included): the chat turn holds the instruction, the filler
    with the fact at `depth` of it (moved back to the nearest sentence end), then the question."""
    tok = gen.tokenizer
    fact, question, answer = needle
    head_text, tail_text = "", ""
    if gen.chat_template:
        text = render_chat(gen.chat_template, [{"role": "user", "content": MARK}], tok)
        head_text, tail_text = text.split(MARK)
    bos = tok.decode([tok.bos_token_id]) if tok.bos_token_id is not None else None
    # as encode_chat: no second BOS when the template writes one
    head = tok.encode(head_text + INSTRUCTION, add_bos=False if bos and head_text.startswith(bos) else None)
    fact_ids = tok.encode(" " + fact, add_bos=False)
    tail = tok.encode(f"\n\nQuestion: {question} Answer in a few words.{tail_text}", add_bos=False)
    room = length - ANSWER_TOKENS - len(head) - len(fact_ids) - len(tail)
    if room < 16:
        raise BitsmithError(f"length {length} leaves {room} filler tokens", where="eval suite needle",
                            fix="use longer needle lengths")
    filler = filler_ids(tok, room)
    ends = [p for p in sentence_ends(tok, filler) if p <= round(depth * room)]
    at = ends[-1] if ends else 0
    ids = head + filler[:at] + fact_ids + filler[at:] + tail
    return NeedlePrompt(ids, len(head) + at, len(head), room, answer, length, depth)


def run_needle(artifact: str | Path, reference: str | Path | None, options: SuiteOptions,
               log: Callable[[str], None] | None = None) -> SuiteResult:
    start = time.perf_counter()
    ref_path, ref_desc = resolve_reference(artifact, reference, log)
    model = Generator(artifact, options.executor, "artifact")
    same = Path(ref_path).resolve() == Path(artifact).resolve()
    ref = model if same else Generator(ref_path, options.executor, "reference")
    lengths = options.needle_lengths or default_lengths(model.max_context)
    too_long = [n for n in lengths if n > model.max_context]
    if too_long:
        raise BitsmithError(f"needle lengths {too_long} exceed the artifact's context of {model.max_context}",
                            where="eval suite needle", fix=f"use lengths up to {model.max_context}")
    needles = NEEDLES[:options.limit] if options.limit else NEEDLES
    prompts = [build_prompt(model, n, d, needle) for n in lengths for d in options.needle_depths for needle in needles]
    metrics: dict[str, float] = {}
    cells: dict[str, dict] = {}
    costs = {}
    for who, gen in (("", model), ("ref_", ref)):
        if who and same:
            metrics["ref_needle"] = metrics["needle"]
            for cell in cells.values():
                cell["hits"]["ref_"], cell["ref_answers"] = cell["hits"].get("", 0), cell["answers"]
            break
        t0 = gen.seconds
        outs = gen.greedy([p.ids for p in prompts], ANSWER_TOKENS,
                          desc=f"needle ({'reference' if who else 'artifact'})")
        costs[f"{who}seconds"] = gen.seconds - t0
        hits = [p.answer.casefold() in o.text.casefold() for p, o in zip(prompts, outs)]
        metrics[f"{who}needle"] = sum(hits) / len(hits)
        for p, o, hit in zip(prompts, outs, hits):
            cell = cells.setdefault(f"{p.length}@{p.depth:g}", {"length": p.length, "depth": p.depth, "hits": {}})
            cell["hits"][who] = cell["hits"].get(who, 0) + hit
            cell.setdefault(f"{who}answers", []).append(o.text)
    for cell in cells.values():
        n = len(needles)
        cell["acc"], cell["ref_acc"] = cell["hits"].get("", 0) / n, cell["hits"].get("ref_", 0) / n
        del cell["hits"]
    details = {"lengths": list(lengths), "depths": list(options.needle_depths), "needles": len(needles),
               "cells": list(cells.values()), "artifact_seconds": costs.get("seconds", 0.0),
               "reference_seconds": costs.get("ref_seconds", 0.0), "chat_template": bool(model.chat_template)}
    return SuiteResult("needle", metrics, details, time.perf_counter() - start, ref_desc)


SUITES["needle"] = run_needle
