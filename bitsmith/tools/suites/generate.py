"""Batched greedy generation for the suites: every prompt is submitted at once to the continuous-batching Engine."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from tqdm import tqdm

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, load_artifact
from bitsmith.runtime.constrained import Constraint
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.runners import open_runner
from bitsmith.runtime.tokenizer import Tokenizer, encode_chat


# Off (None) by default. A dict turns on reuse of outputs within the process: the same artifact, prompts, budget and
# constraints give the same greedy outputs, so a bench scoring several artifacts against one reference runs the
# reference once (bench/eval.py). Keyed by the artifact's resolved path and its manifest's mtime.
MEMO: dict | None = None


def memoized(path: Path, key: tuple, compute: Callable[[], Any]) -> Any:
    if MEMO is None:
        return compute()
    full = (str(path.resolve()), (path / "manifest.json").stat().st_mtime_ns, key)
    if full not in MEMO:
        MEMO[full] = compute()
    return MEMO[full]


@dataclass(frozen=True)
class Generation:
    ids: tuple[int, ...]  # generated token ids (a stop id is not included)
    text: str
    finish: str  # "stop" | "length"
    constraint_error: str | None = None


class Generator:
    """One artifact opened once (kernels, tokenizer) for greedy runs over many prompts."""

    def __init__(self, path: str | Path, executor: str = "compiled", label: str = "") -> None:
        if executor != "compiled":
            raise BitsmithError(f"the generating suites run on the artifact's kernels, not the {executor!r} executor",
                                where="eval suites", fix="use --executor compiled (the ppl suite takes reference)")
        self.path = Path(path)
        self.label = label or self.path.name
        self.artifact: Artifact = load_artifact(path, check_hashes=False)
        self.tokenizer: Tokenizer = self.artifact.tokenizer()
        self.runner = open_runner(self.artifact)
        self.seconds = 0.0  # time spent generating, summed over calls

    @property
    def max_context(self) -> int:
        return int(self.runner.max_context)

    @property
    def chat_template(self) -> str | None:
        return self.artifact.manifest["tokenizer"].get("chat_template")

    def chat_ids(self, prompt: str) -> list[int]:
        """The prompt as the user turn of the chat template; a tokenizer without one gets the plain prompt."""
        if not self.chat_template:
            return self.tokenizer.encode(prompt)
        return encode_chat(self.chat_template, [{"role": "user", "content": prompt}], self.tokenizer)

    def greedy(self, prompts: list[list[int]], max_tokens: int, constraints: list[Constraint | None] | None = None,
               desc: str = "") -> list[Generation]:
        """Greedy outputs of `prompts` (all submitted at once so they share steps), each up to `max_tokens` and
        stopping at EOS; constraints[i] masks prompt i's tokens when set."""
        key = ("greedy", tuple(map(tuple, prompts)), max_tokens, tuple(constraints or ()))
        return memoized(self.path, key, lambda: self._greedy(prompts, max_tokens, constraints, desc))

    def _greedy(self, prompts: list[list[int]], max_tokens: int, constraints: list[Constraint | None] | None,
                desc: str) -> list[Generation]:
        start = time.perf_counter()
        engine = Engine(self.runner, self.tokenizer)
        stop = tuple(self.tokenizer.eos_token_ids or ())
        seqs = []
        for i, prompt in enumerate(prompts):
            room = self.max_context - len(prompt)
            if room < 1:
                raise BitsmithError(f"prompt {i} has {len(prompt)} tokens, the context of {self.label} is "
                                    f"{self.max_context}", where="eval suites", fix="shorten the prompt")
            constraint = constraints[i] if constraints else None
            seqs.append(engine.add(Request(list(prompt), min(max_tokens, room), stop_ids=stop,
                                           constraint=constraint, request_id=str(i))))
        bar = tqdm(total=len(seqs), desc=desc or self.label, leave=False, disable=not sys.stderr.isatty())
        done = 0
        while engine.has_work():
            engine.step()
            finished = sum(s.done for s in seqs)
            bar.update(finished - done)
            done = finished
        bar.close()
        self.seconds += time.perf_counter() - start
        return [Generation(tuple(s.generated), s.text, s.finish_reason or "length", s.constraint_error) for s in seqs]


def first_divergence(a: tuple[int, ...] | list[int], b: tuple[int, ...] | list[int]) -> int | None:
    """Index of the first generated token where two outputs differ (a shorter output that is a prefix of the
    other differs at its end); None when they are equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))
