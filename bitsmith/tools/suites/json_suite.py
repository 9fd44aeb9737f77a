"""The `json` suite: prompts asking for a JSON object of a given schema; the share of outputs that parse and
validate, free-running and under constrained decoding, artifact and reference."""

from __future__ import annotations

import json
import re
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from bitsmith.errors import BitsmithError
from bitsmith.runtime.constrained import Constraint
from bitsmith.tools.suites import SUITES, SuiteOptions, SuiteResult
from bitsmith.tools.suites.generate import Generation, Generator
from bitsmith.tools.suites.golden import read_jsonl
from bitsmith.tools.suites.reference import resolve_reference

FIELDS = {"id": str, "prompt": str, "schema": dict}
FENCE = re.compile(r"```(?:json)?\s*\n?(.*?)```", re.DOTALL)


def matching_brace(text: str, start: int) -> int | None:
    """Index of the '}' closing the '{' at `start`, skipping braces inside JSON strings; None when unclosed."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
    return None


def extract_json(text: str) -> tuple[Any, str | None]:
    """(value, None) for the JSON in a model's output, tried in order: the whole text, a ```json fence, the first
    '{' to its matching '}'; (None, why) when none parses."""
    candidates = [text.strip()]
    fence = FENCE.search(text)
    if fence:
        candidates.append(fence.group(1).strip())
    first = text.find("{")
    if first >= 0:
        end = matching_brace(text, first)
        candidates.append(text[first:end + 1] if end is not None else text[first:])
    error = "no JSON object in the output"
    for candidate in candidates:
        if not candidate:
            continue
        try:
            return json.loads(candidate), None
        except json.JSONDecodeError as exc:
            error = f"not JSON: {exc.msg} at char {exc.pos}"
    return None, error if first >= 0 else "no JSON object in the output"


def check(text: str, schema: dict) -> tuple[bool, str | None]:
    """(valid, why not): the output's JSON parses and validates against `schema`."""
    import jsonschema  # only this suite needs it

    value, error = extract_json(text)
    if error is not None:
        return False, error
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError as exc:
        return False, f"invalid: {exc.message}"
    return True, None


def load_prompts() -> list[dict]:
    text = (resources.files("bitsmith") / "data" / "json_prompts.jsonl").read_text(encoding="utf-8")
    rows = read_jsonl(text, "json_prompts.jsonl", FIELDS, ("id", "prompt", "schema"))
    import jsonschema

    for row in rows:
        try:
            jsonschema.Draft202012Validator.check_schema(row["schema"])
        except jsonschema.SchemaError as exc:
            raise BitsmithError(f"schema of {row['id']!r} is not a JSON schema: {exc.message}",
                                where="json_prompts.jsonl", fix="fix the schema") from exc
    return rows


def _score(rows: list[dict], outs: list[Generation]) -> tuple[float, list[dict]]:
    results = []
    for row, out in zip(rows, outs):
        ok, why = check(out.text, row["schema"])
        if out.constraint_error:
            ok, why = False, f"constraint: {out.constraint_error}"
        results.append({"ok": ok, "why": why, "tokens": len(out.ids), "finish": out.finish, "text": out.text})
    return sum(r["ok"] for r in results) / len(results), results


# Every built-in schema bounds its instances (strings maxLength 40, arrays maxItems, integer ranges, no unbounded
# "number": its fraction digits are not bounded by the grammar): at most ~310 characters, so a constrained run
# closes its object within this many tokens (a digit is one SmolLM2 token); the free run keeps json_max_tokens.
CONSTRAINED_MAX_TOKENS = 400


def _run(gen: Generator, rows: list[dict], max_tokens: int, constrained: bool, name: str) -> tuple[float, list]:
    max_tokens = max(max_tokens, CONSTRAINED_MAX_TOKENS) if constrained else max_tokens
    prompts = [gen.chat_ids(row["prompt"]) for row in rows]
    constraints = ([Constraint("json_schema", json.dumps(row["schema"])) for row in rows] if constrained else None)
    return _score(rows, gen.greedy(prompts, max_tokens, constraints, desc=name))


def run_json(artifact: str | Path, reference: str | Path | None, options: SuiteOptions,
             log: Callable[[str], None] | None = None) -> SuiteResult:
    start = time.perf_counter()
    rows = load_prompts()
    rows = rows[:options.limit] if options.limit else rows
    ref_path, ref_desc = resolve_reference(artifact, reference, log)
    model = Generator(artifact, options.executor, "artifact")
    same = Path(ref_path).resolve() == Path(artifact).resolve()
    ref = model if same else Generator(ref_path, options.executor, "reference")
    max_tokens = options.json_max_tokens
    metrics, details = {}, {"max_tokens": max_tokens, "chat_template": bool(model.chat_template), "prompts": {},
                        "constrained_max_tokens": max(max_tokens, CONSTRAINED_MAX_TOKENS)}
    timing = {}
    for who, gen in (("", model), ("ref_", ref)):
        for mode in ("free", "constrained"):
            name = f"{who}json" + ("_constrained" if mode == "constrained" else "")
            if who and same:  # the artifact is its own reference
                metrics[name], details["prompts"][name] = metrics[name[4:]], details["prompts"][name[4:]]
                continue
            t0 = gen.seconds
            metrics[name], details["prompts"][name] = _run(gen, rows, max_tokens, mode == "constrained", name)
            timing[name] = gen.seconds - t0
    details["seconds"] = timing
    details["ids"] = [row["id"] for row in rows]
    details["reference_seconds"] = sum(v for k, v in timing.items() if k.startswith("ref_"))
    return SuiteResult("json", metrics, details, time.perf_counter() - start, ref_desc)


SUITES["json"] = run_json
