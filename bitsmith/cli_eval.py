"""`bitsmith eval`: how close an artifact is to its 16-bit reference, suite by suite."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bitsmith.cli_common import _log, friendly_errors, main
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.evaluate import EVAL_ACTIVATIONS, resolve_activations
from bitsmith.tools.run import EXECUTORS
from bitsmith.tools.suites import SUITE_MODULES, SuiteOptions, SuiteResult, run_suites, save_results

# per suite: (artifact metric, reference metric, label) rows of its table
TABLE_ROWS = {
    "ppl": [("ppl", "ref_ppl", "perplexity"), ("kld", None, "KL divergence (nats/token)"),
            ("kld_p99", None, "KL divergence p99"), ("top1", None, "top-1 agreement")],
    "golden": [("golden", None, "same greedy output as the reference"), ("golden_acc", "ref_golden_acc", "accuracy"),
               ("golden_divergence_median", None, "median first divergent token")],
    "json": [("json", "ref_json", "valid JSON, free-running"),
             ("json_constrained", "ref_json_constrained", "valid JSON, constrained")],
    "needle": [("needle", "ref_needle", "retrieval accuracy")],
}


def format_suite(result: SuiteResult) -> str:
    m = result.metrics
    rows = TABLE_ROWS.get(result.suite)
    if rows is None:  # serve: one row per metric that has a reference twin
        rows = [(k, f"ref_{k}", k) for k in m if not k.startswith("ref_")]
    lines = [f"[{result.suite}] vs {result.reference}  ({result.seconds:.1f} s"
             + (f", reference {result.details['reference_seconds']:.1f} s)" if "reference_seconds" in result.details
                else ")"),
             f"  {'metric':<38} {'artifact':>10} {'reference':>10}"]
    for key, ref_key, label in rows:
        if key not in m:
            continue
        ref = f"{m[ref_key]:>10.4g}" if ref_key and ref_key in m else f"{'-':>10}"
        lines.append(f"  {label:<38} {m[key]:>10.4g} {ref}")
    if result.suite == "needle":
        for cell in result.details.get("cells", []):
            lines.append(f"  {'length ' + str(cell['length']) + ' depth ' + format(cell['depth'], 'g'):<38} "
                         f"{cell['acc']:>10.4g} {cell['ref_acc']:>10.4g}")
    return "\n".join(lines)


def parse_suites(value: str) -> list[str]:
    names = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [n for n in names if n not in SUITE_MODULES]
    if unknown or not names:
        raise BitsmithError(f"unknown suite {', '.join(unknown) or value!r}", where="eval --suite",
                            fix=f"use a comma-separated list of {', '.join(SUITE_MODULES)}")
    return names


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--suite", "suites", default="ppl", show_default=True,
              help=f"Comma-separated suites: {', '.join(SUITE_MODULES)}.")
@click.option("--text", "text_file", default=None, type=click.Path(path_type=Path),
              help="ppl: plain-text file to score [default: the built-in held-out text].")
@click.option("--tokens", default=None, type=click.IntRange(min=1),
              help="ppl: score only the first N tokens of the text [default: 4096 of the built-in text, all of "
                   "--text].")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(min=2), help="ppl: window length in tokens.")
@click.option("--reference", default=None, type=click.Path(path_type=Path),
              help="Reference artifact or model (default: the artifact's source, compiled unquantized once into "
                   "~/.cache/bitsmith/references; an unquantized artifact is its own reference).")
@click.option("--golden", "golden_file", default=None, type=click.Path(path_type=Path),
              help='golden: your JSONL prompts, one {"id", "prompt", optional "category", "expected", "regex"} '
                   "a line [default: the built-in set].")
@click.option("--limit", default=None, type=click.IntRange(min=1),
              help="golden/json: only the first N prompts; needle: N facts per cell (a quick run).")
@click.option("--needle-lengths", default=None, help="needle: context lengths, e.g. 256,1024 [default: powers of "
                                                     "two from 256 up to the artifact's context].")
@click.option("--concurrency", default="1,4,16", show_default=True, help="serve: concurrency levels.")
@click.option("--json", "as_json", is_flag=True,
              help='Print JSON: {suite: {"metrics", "details", "seconds", "reference"}} (with --suite ppl alone and '
                   '--text: the former {"ppl", "ref_ppl", "kld_mean", ...}).')
@click.option("--no-save", is_flag=True, help="Do not write the results into ARTIFACT/evals.json.")
@click.option("--executor", type=click.Choice(EXECUTORS), default="compiled", show_default=True,
              help="What runs ARTIFACT: compiled: its kernels (an artifact without kernels for this machine is an "
                   "error); reference: the numpy reference executor on its dequantized weights (ppl only). The "
                   "ppl reference model always runs on the reference executor.")
@click.option("--activations", type=click.Choice(EVAL_ACTIVATIONS), default="auto", show_default=True,
              help="What the quantized matmuls' inputs are: auto: what the artifact's kernels use (int8 when it was "
                   "compiled with --activations int8 or auto on a target with int8 dot products); int8 / float32 on "
                   "the reference executor: emulated (ppl only; other suites run the kernels and must match them).")
@friendly_errors
def eval_command(artifact: Path, suites: str, text_file: Path | None, tokens: int | None, ctx: int,
                 reference: Path | None, golden_file: Path | None, limit: int | None, needle_lengths: str | None,
                 concurrency: str, as_json: bool, no_save: bool, executor: str, activations: str) -> None:
    """Compare ARTIFACT with its unquantized reference, suite by suite, and save the results in evals.json.

    ppl: perplexity, KL divergence and top-1 agreement on a text. The text is tokenized without
    special tokens, cut into non-overlapping windows of CTX tokens; when the tokenizer adds BOS, each
    window gets BOS prepended and every token is scored, otherwise the first token of each window is
    context only. PPL = exp(mean NLL).
    golden: greedy answers through the chat template, token-identical to the reference's or not (and
    the first divergent token), accuracy where a prompt has an expected answer.
    json: share of outputs that parse and validate against the asked schema, free and constrained.
    needle: retrieval of a fact hidden at several depths of several context lengths.
    serve: latency and throughput at each concurrency (as `bitsmith bench`), artifact and reference.
    """
    names = parse_suites(suites)
    if text_file is not None and not text_file.is_file():
        raise BitsmithError(f"text file {str(text_file)!r} does not exist", fix="check the --text path")
    try:
        levels = tuple(int(c) for c in concurrency.split(","))
        lengths = tuple(int(n) for n in needle_lengths.split(",")) if needle_lengths else ()
    except ValueError as exc:
        raise BitsmithError("--concurrency and --needle-lengths take comma-separated integers",
                            fix="write e.g. 1,4,16") from exc
    if not levels or min(levels) < 1 or (lengths and min(lengths) < 1):  # a level 0 submits nothing to time
        raise BitsmithError(f"--concurrency {concurrency!r} / --needle-lengths {needle_lengths!r} must be positive",
                            fix="write e.g. 1,4,16")
    options = SuiteOptions(text=str(text_file) if text_file else None,
                           tokens=tokens if tokens or text_file else SuiteOptions.tokens, ctx=ctx,
                           golden=str(golden_file) if golden_file else None, limit=limit, needle_lengths=lengths,
                           concurrency=levels, executor=executor,
                           activations=resolve_activations(load_artifact(artifact, check_hashes=False).manifest,
                                                           activations))
    if not as_json:
        _log(f"eval {artifact}  suites={','.join(names)} executor={executor} activations={options.activations}")
    results = run_suites(artifact, names, reference, options, log=None if as_json else _log)
    if not no_save:
        path = save_results(artifact, results)
        if not as_json:
            _log(f"saved {path}")
    if as_json:
        if names == ["ppl"] and text_file is not None:  # the former output of `eval --text`
            click.echo(json.dumps(_former_ppl_json(results["ppl"])))
        else:
            click.echo(json.dumps({name: r.to_json() for name, r in results.items()}))
        return
    for name, result in results.items():
        if name == "ppl":
            d, m = result.details, result.metrics
            click.echo(f"protocol: {d['windows']} windows x {d['ctx']} tokens, BOS "
                       f"{'prepended' if d['bos'] else 'not used'}, {d['tokens']} scored tokens")
            click.echo(f"ppl {m['ppl']:.4f}  ref_ppl {m['ref_ppl']:.4f}  kld_mean {m['kld']:.6f}  "
                       f"kld_p99 {m['kld_p99']:.6f}  top1_agree {m['top1']:.4f}")
        if len(names) > 1 or name != "ppl":
            click.echo(format_suite(result))


def _former_ppl_json(result: SuiteResult) -> dict:
    m, d = result.metrics, result.details
    return {"ppl": m["ppl"], "ref_ppl": m["ref_ppl"], "kld_mean": m["kld"], "kld_p99": m["kld_p99"],
            "top1_agree": m["top1"], "tokens": d["tokens"], "windows": d["windows"], "ctx": d["ctx"], "bos": d["bos"],
            "activations": d["activations"]}
