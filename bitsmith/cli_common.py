"""The `bitsmith` command group and what every command shares: the log line and the one-line error handler."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable

import click

from bitsmith.errors import BitsmithError


def _log(message: str) -> None:
    click.echo(message, err=True)


def friendly_errors(fn: Callable) -> Callable:
    """Turn a BitsmithError into one `error: ...` line on stderr and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BitsmithError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except MemoryError:
            click.echo("error: out of memory (fix: use a smaller model or --dtype float16)", err=True)
            sys.exit(2)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="bitsmith")
def main() -> None:
    """bitsmith: compile LLM checkpoints into optimized artifacts and run them.

    \b
    Typical use:
      bitsmith compile -o smollm2            # the built-in default model (SmolLM2-135M-Instruct)
      bitsmith compile path/to/hf_dir -o out --dtype float16
      bitsmith inspect out
      bitsmith run out "Once upon a time" --max-tokens 32
    """
