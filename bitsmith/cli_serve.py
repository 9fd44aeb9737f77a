"""`bitsmith run`, `serve` and `bench`: the commands that run an artifact (the runtime only, never the compiler)."""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import click

from bitsmith.cli_common import _log, friendly_errors, main
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.bench import agreement_with_first, bench_prompts, format_table, run_concurrency, run_rounds
from bitsmith.runtime.constrained import Constraint
from bitsmith.runtime.engine import Engine
from bitsmith.runtime.runners import open_runner
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.server import Server
from bitsmith.runtime.tvm_lib import runtime_library_only
from bitsmith.tools.run import EXECUTORS, run_prompt


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("prompt")
@click.option("--max-tokens", default=64, show_default=True, type=click.IntRange(min=0), help="Tokens to generate.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(min=0.0),
              help="0 is greedy decoding.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 disables top-k.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Random seed for sampling.")
@click.option("--chat", is_flag=True, help="Wrap PROMPT as a user message with the model's chat template.")
@click.option("--json", "as_json", is_flag=True, help='Print {"text": ..., "token_ids": [...]} (generated ids only).')
@click.option("--executor", type=click.Choice(EXECUTORS), default="compiled", show_default=True,
              help="compiled: the artifact's kernels (an artifact without kernels for this machine is an error); "
                   "reference: the numpy reference executor (slow; the oracle, and the way to run an artifact "
                   "compiled with --target none).")
@click.option("--json-schema", "json_schema", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Constrain the output to JSON valid under the schema in this file (needs llguidance).")
@click.option("--regex", default=None, help="Constrain the whole output to match this regular expression.")
@friendly_errors
def run(artifact: Path, prompt: str, max_tokens: int, temperature: float, top_k: int, top_p: float,
        seed: int | None, chat: bool, as_json: bool, executor: str, json_schema: Path | None,
        regex: str | None) -> None:
    """Generate a continuation of PROMPT with a compiled ARTIFACT."""
    runtime_library_only()  # runs, never compiles: libtvm_runtime.so without the compiler library
    if json_schema and regex:
        raise BitsmithError("--json-schema and --regex both constrain the output", fix="pass one of them")
    constraint = (Constraint("json_schema", json_schema.read_text()) if json_schema
                  else Constraint("regex", regex) if regex is not None else None)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    stream = None if as_json else (lambda piece: click.echo(piece, nl=False))
    text, ids = run_prompt(artifact, prompt, max_tokens, params, chat=chat, on_text=stream, executor=executor,
                           constraint=constraint)
    if as_json:
        click.echo(json.dumps({"text": text, "token_ids": ids}))
    else:
        click.echo()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="0 picks a free port.")
@click.option("--max-pending", default=64, show_default=True, type=click.IntRange(min=1),
              help="Requests admitted at once (running + queued); more get 429.")
@click.option("--model-name", default=None, help="Model id reported by /v1/models [default: the artifact's name].")
@friendly_errors
def serve(artifact: Path, host: str, port: int, max_pending: int, model_name: str | None) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (continuous batching on the compiled kernels).

    \b
    Routes: POST /v1/completions, POST /v1/chat/completions ("stream": true for server-sent events),
    GET /v1/models, GET /health. Ctrl-C (or SIGTERM) stops accepting and finishes in-flight requests.
    """
    runtime_library_only()
    art = load_artifact(artifact)
    tokenizer = art.tokenizer()
    engine = Engine(open_runner(art), tokenizer)
    name = model_name or Path(artifact).resolve().name
    server = Server(engine, tokenizer, name, art.manifest["tokenizer"].get("chat_template"), host, port, max_pending)
    _log(f"serving {name} on http://{host}:{server.port} (KV pool {engine.pool.num_blocks} blocks x "
         f"{engine.pool.block_size} tokens, batch {engine.budget} rows, max pending {max_pending})")

    def stop(*_: Any) -> None:
        _log("shutting down: finishing in-flight requests")
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()
    _log("stopped")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--concurrency", "levels", default="1,4,16", show_default=True, help="Comma-separated concurrencies.")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(min=1))
@click.option("--output-tokens", default=64, show_default=True, type=click.IntRange(min=1))
@click.option("--requests", default=None, type=click.IntRange(min=1),
              help="Requests per concurrency level [default: 2 x concurrency, at least 4].")
@click.option("--rounds", default=1, show_default=True, type=click.IntRange(min=1),
              help="Run the levels this many times, interleaved; report each level's median run and the "
                   "median ratio of its throughput to the first level's within a round.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@friendly_errors
def bench(artifact: Path, levels: str, prompt_tokens: int, output_tokens: int, requests: int | None,
          rounds: int, as_json: bool) -> None:
    """Time to first token, inter-token latency and throughput of ARTIFACT at each concurrency.

    Greedy decoding of fixed-length outputs from a fixed-length prompt, closed loop: a new request
    starts as soon as one finishes, on the continuous-batching engine (no HTTP). Request i has the same
    prompt at every level; "1st token = c1" is the share of requests whose first token matches the
    first level's (a check that batched steps agree with single-sequence ones). On a shared machine
    speeds drift between levels: --rounds 3 or more gives medians and within-round ratios.
    """
    runtime_library_only()
    art = load_artifact(artifact)
    tokenizer = art.tokenizer()
    runner = open_runner(art)
    prompt_of = bench_prompts(tokenizer, prompt_tokens)
    try:
        conc = [int(c) for c in levels.split(",")]
    except ValueError as exc:
        raise BitsmithError(f"--concurrency {levels!r} is not a list of integers", fix="write e.g. 1,4,16") from exc
    if not conc or min(conc) < 1:
        raise BitsmithError(f"--concurrency {levels!r} has a level below 1", fix="write e.g. 1,4,16")
    _log(f"bench {artifact}: prompt {prompt_tokens} tokens, output {output_tokens} tokens, concurrency {conc}"
         + (f", {rounds} rounds" if rounds > 1 else ""))

    def level(c: int) -> Any:
        return run_concurrency(lambda: Engine(runner, tokenizer), prompt_of, output_tokens, c, requests or max(4, 2 * c))
    results = agreement_with_first(run_rounds(level, conc, rounds))
    if as_json:
        click.echo(json.dumps({"prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "rounds": rounds,
                               "results": [r.to_json() for r in results]}))
    else:
        click.echo(format_table(results))
