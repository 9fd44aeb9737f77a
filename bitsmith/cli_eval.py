"""`bitsmith eval`: how close an artifact is to its 16-bit reference."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bitsmith.cli_common import friendly_errors, main
from bitsmith.errors import BitsmithError
from bitsmith.tools.evaluate import evaluate
from bitsmith.tools.run import EXECUTORS


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path), help="Plain-text file to score.")
@click.option("--tokens", default=None, type=click.IntRange(min=1), help="Score only the first N tokens of the text.")
@click.option("--ctx", default=256, show_default=True, type=click.IntRange(min=2), help="Window length in tokens.")
@click.option("--reference", default=None, type=click.Path(path_type=Path),
              help="Reference model or artifact for KLD (default: the artifact's 16-bit source).")
@click.option("--json", "as_json", is_flag=True,
              help='Print {"ppl", "ref_ppl", "kld_mean", "kld_p99", "top1_agree", "tokens", ...}.')
@click.option("--executor", type=click.Choice(EXECUTORS), default="compiled", show_default=True,
              help="What scores ARTIFACT: compiled: its kernels (an artifact without kernels for this machine is an "
                   "error); reference: the numpy reference executor on its dequantized weights. The reference "
                   "model always runs on the reference executor.")
@friendly_errors
def eval_command(artifact: Path, text_file: Path, tokens: int | None, ctx: int, reference: Path | None,
                 as_json: bool, executor: str) -> None:
    """Perplexity of ARTIFACT on a text, and KL divergence / top-1 agreement against the 16-bit model.

    Protocol: the text is tokenized without special tokens, cut into non-overlapping windows of CTX
    tokens; when the tokenizer adds BOS, each window gets BOS prepended and every token is scored,
    otherwise the first token of each window is context only. PPL = exp(mean NLL).
    """
    if not text_file.is_file():
        raise BitsmithError(f"text file {str(text_file)!r} does not exist", fix="check the --text path")
    result = evaluate(artifact, text_file.read_text(encoding="utf-8", errors="replace"), tokens, ctx, reference,
                      executor)
    if as_json:
        click.echo(json.dumps(result.to_json()))
        return
    click.echo(f"protocol: {result.windows} windows x {ctx} tokens, BOS {'prepended' if result.bos else 'not used'}, "
               f"{result.tokens} scored tokens")
    click.echo(f"ppl {result.ppl:.4f}  ref_ppl {result.ref_ppl:.4f}  kld_mean {result.kld_mean:.6f}  "
               f"kld_p99 {result.kld_p99:.6f}  top1_agree {result.top1_agree:.4f}")
