"""The `ppl` suite: perplexity, KL divergence and top-1 agreement against the reference on a held-out text."""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Callable

from bitsmith.errors import BitsmithError
from bitsmith.tools.evaluate import evaluate
from bitsmith.tools.suites import SUITES, SuiteOptions, SuiteResult


def suite_text(options: SuiteOptions) -> tuple[str, str]:
    """(text, where it came from): --text, else the built-in held-out text (never the calibration text)."""
    if options.text is not None:
        path = Path(options.text)
        if not path.is_file():
            raise BitsmithError(f"text file {str(path)!r} does not exist", where="eval suite ppl",
                                fix="check the --text path")
        return path.read_text(encoding="utf-8", errors="replace"), str(path)
    builtin = resources.files("bitsmith") / "data" / "eval.txt"
    return builtin.read_text(encoding="utf-8"), "built-in eval.txt"


def run_ppl(artifact: str | Path, reference: str | Path | None, options: SuiteOptions,
            log: Callable[[str], None] | None = None) -> SuiteResult:
    start = time.perf_counter()
    text, where = suite_text(options)
    # run_suites resolved options.activations and checked the compiled executor's kernels compute with them
    r = evaluate(artifact, text, options.tokens, options.ctx, reference, options.executor,
                 options.activations if options.executor == "reference" else "float32")
    metrics = {"ppl": r.ppl, "ref_ppl": r.ref_ppl, "kld": r.kld_mean, "kld_p99": r.kld_p99, "top1": r.top1_agree,
               "ppl_increase": r.ppl / r.ref_ppl - 1 if r.ref_ppl else 0.0}
    details = {"text": where, "tokens": r.tokens, "windows": r.windows, "ctx": r.ctx, "bos": r.bos,
               "activations": options.activations}
    return SuiteResult("ppl", metrics, details, time.perf_counter() - start,
                       str(reference) if reference else "the artifact's 16-bit source")


SUITES["ppl"] = run_ppl
