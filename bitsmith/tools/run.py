"""`bitsmith run`: load an artifact, encode the prompt, generate, decode."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, load_artifact
from bitsmith.runtime.constrained import Constraint, Guide
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.session import CompiledSession
from bitsmith.runtime.tokenizer import Tokenizer, encode_chat


def reference_session(artifact: Artifact, max_context: int | None = None) -> ReferenceSession:
    module = Module.from_json(artifact.manifest["ir"])
    return ReferenceSession(module, artifact.weights, max_context or artifact.max_context)


EXECUTORS = ("compiled", "reference")


def open_session(artifact: Artifact, executor: str = "compiled", max_context: int | None = None):
    """A session for `executor`: "compiled" (the artifact's kernels; an artifact without kernels, or with kernels
    for another machine, is an error that says so) or "reference" (numpy), never one in place of the other."""
    if executor not in EXECUTORS:
        raise BitsmithError(f"unknown executor {executor!r}", fix=f"use one of {', '.join(EXECUTORS)}")
    if executor == "reference":
        return reference_session(artifact, max_context)
    return CompiledSession(artifact, max_context)


def encode_prompt(artifact: Artifact, prompt: str, chat: bool, tokenizer: Tokenizer | None = None) -> list[int]:
    tokenizer = tokenizer or artifact.tokenizer()
    if not chat:
        return tokenizer.encode(prompt)
    return encode_chat(artifact.manifest["tokenizer"].get("chat_template"), [{"role": "user", "content": prompt}],
                       tokenizer)


def run_prompt(path: str | Path, prompt: str, max_tokens: int, params: SamplingParams, chat: bool = False,
               on_text: Callable[[str], None] | None = None, executor: str = "compiled",
               constraint: Constraint | None = None) -> tuple[str, list[int]]:
    """Generate from `prompt` (matching `constraint` when given); returns (generated text, generated ids).
    `on_text` streams text pieces."""
    artifact = load_artifact(path)
    tokenizer = artifact.tokenizer()
    prompt_ids = encode_prompt(artifact, prompt, chat, tokenizer)
    session = open_session(artifact, executor, min(artifact.max_context, len(prompt_ids) + max(max_tokens, 1)))
    ids: list[int] = []
    shown = ""
    guide = Guide(tokenizer, constraint) if constraint is not None else None
    for token in generate(session, prompt_ids, max_tokens, params, stop_ids=tokenizer.eos_token_ids, guide=guide):
        ids.append(token)
        text = tokenizer.decode(ids)
        if on_text and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            on_text(text[len(shown):])
            shown = text
    text = tokenizer.decode(ids)
    if on_text and len(text) > len(shown):
        on_text(text[len(shown):])
    return text, ids
