"""Evaluation suites (`bitsmith eval --suite`): each compares an artifact with its unquantized reference on the
same inputs and returns a SuiteResult whose `metrics` the compile-time gate reads.

Interface fixed first (issue 19):
- `SUITES`: name -> run(artifact_path, reference, options, log) -> SuiteResult, filled by the suite modules
  (ppl.py, golden.py, json_suite.py, needle.py, serve.py).
- Gate-able metric names (all floats; a gate condition is `name<=x` or `name>=x`):
    ppl:    kld (mean KL divergence, nats/token), kld_p99, top1 (top-1 agreement), ppl, ref_ppl,
            ppl_increase (ppl / ref_ppl - 1)
    golden: golden (share of prompts whose greedy output equals the reference's), golden_acc (share of prompts
            with an expected answer/regex that the artifact gets right), ref_golden_acc, golden_divergence_median
            (median index of the first differing generated token over the prompts that differ; -1 when none do)
    json:   json (share of free-running outputs that parse and validate), json_constrained (the same with
            constrained decoding), ref_json, ref_json_constrained
    needle: needle (retrieval accuracy over depth x length), ref_needle
    serve:  tok_s_c1, tok_s_c4, tok_s_c16 (output tokens/s), ttft_ms_c1, itl_ms_c1, and the reference's as
            ref_tok_s_c1, ... (tok_s, ttft_ms and itl_ms at every level of SuiteOptions.concurrency)
- `suite(name)` / `run_suites(artifact, names, reference, options, log)`: import the suite modules (which fill
  SUITES) and run them; every suite times itself (SuiteResult.seconds) and puts what the reference run cost in
  details["reference_seconds"] (the reference is compiled once per source into the cache of reference.py).
- Results are saved beside the manifest in `<artifact>/evals.json` ({suite: SuiteResult.to_json()}, merged on
  each run, written atomically) so `bitsmith report` shows them.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from bitsmith.errors import BitsmithError

EVALS_FILE = "evals.json"


@dataclass(frozen=True)
class SuiteOptions:
    """What the suites run on; every default is what `bitsmith eval --suite` uses without options."""

    text: str | None = None  # ppl: plain-text file (None: the built-in held-out text, bitsmith/data/eval.txt)
    tokens: int | None = 4096  # ppl: score the first N tokens of the text
    ctx: int = 256  # ppl: window length
    golden: str | None = None  # golden: JSONL file (None: the built-in set, bitsmith/data/golden.jsonl)
    limit: int | None = None  # golden/json: only the first N prompts (quick gates)
    max_tokens: int = 48  # golden: greedy tokens per prompt
    json_max_tokens: int = 160  # json: greedy tokens per prompt (an object cut short does not parse)
    needle_lengths: tuple[int, ...] = ()  # needle: context lengths in tokens (): powers of two up to the context
    needle_depths: tuple[float, ...] = (0.1, 0.5, 0.9)  # needle: where the fact sits, as a share of the filler
    concurrency: tuple[int, ...] = (1, 4, 16)  # serve: levels
    executor: str = "compiled"  # what runs the artifact: compiled | reference
    activations: str = "auto"  # auto (the artifact's kernels') | float32 | int8: int8 emulated on the reference executor

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class SuiteResult:
    suite: str
    metrics: dict[str, float]  # gate-able scalars (names above)
    details: dict[str, Any] = field(default_factory=dict)  # per-prompt / per-cell tables for the report
    seconds: float = 0.0  # wall time of the suite, reference included
    reference: str = ""  # what the artifact was compared with (path or description)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "SuiteResult":
        return cls(**data)


SuiteRunner = Callable[..., SuiteResult]  # (artifact_path, reference, options, log) -> SuiteResult
SUITES: dict[str, SuiteRunner] = {}
SUITE_MODULES = {"ppl": "ppl", "golden": "golden", "json": "json_suite", "needle": "needle", "serve": "serve"}


def suite(name: str) -> SuiteRunner:
    """The runner of suite `name`; its module is imported here (not at the top: each suite module imports this
    package for SUITES, SuiteOptions and SuiteResult)."""
    import importlib

    from bitsmith.errors import BitsmithError

    if name not in SUITE_MODULES:
        raise BitsmithError(f"unknown suite {name!r}", where="eval suites", fix=f"use {', '.join(SUITE_MODULES)}")
    importlib.import_module(f"{__name__}.{SUITE_MODULES[name]}")
    return SUITES[name]


def run_suites(artifact: str | Path, names: list[str] | tuple[str, ...], reference: str | Path | None = None,
               options: SuiteOptions = SuiteOptions(), log: Callable[[str], None] | None = None
               ) -> dict[str, SuiteResult]:
    """Run the named suites in order (each checked before any runs) and return {name: result}."""
    runners = [(name, suite(name)) for name in names]
    options = with_honoured_activations(artifact, names, options)
    results = {name: run(artifact, reference, options, log) for name, run in runners}
    for result in results.values():
        result.details.setdefault("activations", options.activations)
    return results


def with_honoured_activations(artifact: str | Path, names: list[str] | tuple[str, ...],
                              options: SuiteOptions) -> SuiteOptions:
    """`options` with activations resolved against the artifact (auto: its kernels'), or a BitsmithError where a
    suite of `names` cannot compute with them: only ppl on the reference executor emulates activations other than
    the kernels'."""
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.tools.evaluate import kernel_activations, resolve_activations

    manifest = load_artifact(artifact, check_hashes=False).manifest
    activations = resolve_activations(manifest, options.activations)
    kernels = kernel_activations(manifest)
    for name in names:
        if activations != kernels and not (name == "ppl" and options.executor == "reference"):
            raise BitsmithError(f"suite {name} runs the artifact's kernels, which compute with {kernels} activations, "
                                f"not {activations}", where="eval --activations",
                                fix="use --activations auto, or --suite ppl --executor reference to emulate "
                                    f"{activations} activations")
    return replace(options, activations=activations)


def save_results(artifact: str | Path, results: dict[str, SuiteResult]) -> Path:
    """Merge `results` into <artifact>/evals.json (replace-on-rename: a crash leaves the old file whole)."""
    path = Path(artifact) / EVALS_FILE
    merged = load_results(artifact)
    merged.update(results)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".evals-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({name: r.to_json() for name, r in merged.items()}, f, indent=1)
        os.replace(tmp, path)
    except BaseException:  # a value json cannot write, a full disk, Ctrl-C: no half-written file stays beside it
        os.unlink(tmp)
        raise
    return path


def load_results(artifact: str | Path) -> dict[str, SuiteResult]:
    path = Path(artifact) / EVALS_FILE
    if not path.is_file():
        return {}
    try:
        return {name: SuiteResult.from_json(data) for name, data in json.loads(path.read_text()).items()}
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise BitsmithError(f"{path} is not an evals.json this version wrote ({exc})", where="eval suites",
                            fix=f"delete {path} and run `bitsmith eval` again") from exc
