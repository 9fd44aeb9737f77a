"""`bitsmith report`: one self-contained HTML page about an artifact."""

from __future__ import annotations

from pathlib import Path

import click

from bitsmith.cli_common import friendly_errors, main


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="HTML file to write.")
@click.option("--pareto", "pareto_file", default=None, type=click.Path(path_type=Path),
              help="A search's Pareto front (OUTPUT.pareto.json of `bitsmith search -o OUTPUT`) [default: the one "
                   "`compile --plan` recorded in the artifact, if any].")
@friendly_errors
def report(artifact: Path, output: Path, pareto_file: Path | None) -> None:
    """Write one HTML page about ARTIFACT (no other file, no network): header (model, source, target, sizes, bits
    per weight, compile options), the precision plan per layer, the search's Pareto front, the eval suites'
    results against the reference (`bitsmith eval` writes them into the artifact), the quality gate's attempts,
    the memory plan and the KV cache plan. A section without data says so."""
    from bitsmith.tools.report import write_report  # heavy: matplotlib, the compiler

    out = write_report(artifact, output, pareto_file)
    click.echo(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")
