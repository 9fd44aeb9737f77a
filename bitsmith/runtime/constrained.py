"""Constrained decoding: what a sequence's output must match (a JSON schema, any JSON object, a regex, a grammar).

Interface fixed first (issue 19); the mask machinery (llguidance, imported lazily so the runtime runs without it
until a request asks for a constraint) is built on it.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.errors import BitsmithError

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
