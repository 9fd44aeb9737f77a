"""The `golden` suite: greedy answers to fixed prompts, compared token by token with the reference's, and checked
against expected answers where the prompt has one."""

from __future__ import annotations

import json
import re
import statistics
import time
from importlib import resources
from pathlib import Path
from typing import Callable

from bitsmith.errors import BitsmithError
from bitsmith.tools.suites import SUITES, SuiteOptions, SuiteResult
from bitsmith.tools.suites.generate import Generation, Generator, first_divergence
from bitsmith.tools.suites.reference import resolve_reference

FIELDS = {"id": str, "category": str, "prompt": str, "expected": str, "regex": str}
REQUIRED = ("id", "prompt")


def read_jsonl(text: str, where: str, fields: dict[str, type], required: tuple[str, ...]) -> list[dict]:
    """Rows of a JSONL text, each checked: an object, the required keys, known keys of the right type, unique
    ids; a bad line is an error naming the file and line."""
    rows, seen = [], set()
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        at = f"{where}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BitsmithError(f"not JSON: {exc.msg}", where=at, fix="write one JSON object per line") from exc
        if not isinstance(row, dict):
            raise BitsmithError("the line is not a JSON object", where=at, fix='write {"id": ..., "prompt": ...}')
        missing = [k for k in required if k not in row]
        unknown = sorted(set(row) - set(fields))
        if missing or unknown:
            raise BitsmithError(f"missing {missing}" if missing else f"unknown keys {unknown}", where=at,
                                fix=f"keys: {', '.join(fields)} ({', '.join(required)} required)")
        for key, kind in fields.items():
            if key in row and not isinstance(row[key], kind):
                raise BitsmithError(f"{key!r} is {type(row[key]).__name__}, not {kind.__name__}", where=at,
                                    fix=f"make {key!r} a {'string' if kind is str else kind.__name__}")
        if not str(row.get("prompt", "x")).strip():
            raise BitsmithError("the prompt is empty", where=at, fix="write a prompt")
        if row["id"] in seen:
            raise BitsmithError(f"id {row['id']!r} repeats", where=at, fix="give every row its own id")
        if "regex" in row:
            try:
                re.compile(row["regex"])
            except re.error as exc:
                raise BitsmithError(f"regex {row['regex']!r} does not compile: {exc}", where=at,
                                    fix="fix the regular expression (Python syntax)") from exc
        seen.add(row["id"])
        rows.append(row)
    if not rows:
        raise BitsmithError("no prompts", where=where, fix="write one JSON object per line")
    return rows


def load_golden(path: str | None) -> tuple[list[dict], str]:
    """(rows, where from): --golden FILE, else the built-in set bitsmith/data/golden.jsonl."""
    if path is None:
        text = (resources.files("bitsmith") / "data" / "golden.jsonl").read_text(encoding="utf-8")
        where = "golden.jsonl"
    else:
        if not Path(path).is_file():
            raise BitsmithError(f"golden file {path!r} does not exist", where="eval suite golden",
                                fix="check the --golden path")
        text, where = Path(path).read_text(encoding="utf-8"), path
    rows = read_jsonl(text, where, FIELDS, REQUIRED)
    for row in rows:
        row.setdefault("category", "other")
    return rows, where


def correct(row: dict, text: str) -> bool | None:
    """Does `text` answer `row`: contains `expected` (case-insensitive) and matches `regex`; None without either."""
    if "expected" not in row and "regex" not in row:
        return None
    ok = True
    if "expected" in row:
        ok = row["expected"].casefold() in text.casefold()
    if "regex" in row:
        ok = ok and re.search(row["regex"], text) is not None
    return ok


def _accuracy(marks: list[bool | None]) -> float:
    graded = [m for m in marks if m is not None]
    return sum(graded) / len(graded) if graded else 0.0


def run_golden(artifact: str | Path, reference: str | Path | None, options: SuiteOptions,
               log: Callable[[str], None] | None = None) -> SuiteResult:
    start = time.perf_counter()
    rows, where = load_golden(options.golden)
    rows = rows[:options.limit] if options.limit else rows
    ref_path, ref_desc = resolve_reference(artifact, reference, log)
    model = Generator(artifact, options.executor, "artifact")
    same = Path(ref_path).resolve() == Path(artifact).resolve()
    ref = model if same else Generator(ref_path, options.executor, "reference")
    prompts = [model.chat_ids(row["prompt"]) for row in rows]
    outs = model.greedy(prompts, options.max_tokens, desc="golden (artifact)")
    ref_seconds = 0.0
    if same:
        ref_outs = outs
    else:
        before = ref.seconds
        ref_outs = ref.greedy([ref.chat_ids(row["prompt"]) for row in rows], options.max_tokens,
                              desc="golden (reference)")
        ref_seconds = ref.seconds - before
    return golden_result(rows, outs, ref_outs, {
        "golden_file": where, "chat_template": bool(model.chat_template), "max_tokens": options.max_tokens,
        "artifact_seconds": model.seconds, "reference_seconds": ref_seconds}, time.perf_counter() - start, ref_desc)


def golden_result(rows: list[dict], outs: list[Generation], ref_outs: list[Generation], details: dict,
                  seconds: float, reference: str) -> SuiteResult:
    prompts, divergences = [], []
    for row, out, ref in zip(rows, outs, ref_outs):
        div = first_divergence(out.ids, ref.ids)
        if div is not None:
            divergences.append(div)
        prompts.append({"id": row["id"], "category": row["category"], "first_divergence": div,
                        "correct": correct(row, out.text), "ref_correct": correct(row, ref.text),
                        "text": out.text, "ref_text": ref.text, "tokens": len(out.ids)})
    metrics = {"golden": sum(p["first_divergence"] is None for p in prompts) / len(prompts),
               "golden_acc": _accuracy([p["correct"] for p in prompts]),
               "ref_golden_acc": _accuracy([p["ref_correct"] for p in prompts]),
               "golden_divergence_median": float(statistics.median(divergences)) if divergences else -1.0}
    categories: dict[str, dict] = {}
    for p in prompts:
        c = categories.setdefault(p["category"], {"prompts": 0, "same": 0, "correct": [], "ref_correct": []})
        c["prompts"] += 1
        c["same"] += p["first_divergence"] is None
        c["correct"].append(p["correct"])
        c["ref_correct"].append(p["ref_correct"])
    details["categories"] = {k: {"prompts": c["prompts"], "golden": c["same"] / c["prompts"],
                                 "acc": _accuracy(c["correct"]), "ref_acc": _accuracy(c["ref_correct"])}
                             for k, c in categories.items()}
    details["prompts"] = prompts
    return SuiteResult("golden", metrics, details, seconds, reference)


SUITES["golden"] = run_golden
