"""`python -m bitsmith.runtime run|serve ARTIFACT`: the device's entry point, the runtime alone (no compiler, no click)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.runtime.tokenizer import encode_chat
from bitsmith.runtime.tvm_lib import runtime_library_only


def run_prompt(args: argparse.Namespace) -> None:
    """Generate from the prompt on the artifact's compiled kernels, streaming text (or one JSON line)."""
    from bitsmith.runtime.session import CompiledSession

    artifact = load_artifact(args.artifact)
    tokenizer = artifact.tokenizer()
    if args.chat:
        prompt = encode_chat(artifact.manifest["tokenizer"].get("chat_template"),
                             [{"role": "user", "content": args.prompt}], tokenizer)
    else:
        prompt = tokenizer.encode(args.prompt)
    session = CompiledSession(artifact, min(artifact.max_context, len(prompt) + max(args.max_tokens, 1)))
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    ids: list[int] = []
    shown = ""
    for token in generate(session, prompt, args.max_tokens, params, stop_ids=tokenizer.eos_token_ids):
        ids.append(token)
        text = tokenizer.decode(ids)
        if not args.json and not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    text = tokenizer.decode(ids)
    if args.json:
        print(json.dumps({"text": text, "token_ids": ids}))
    else:
        print(text[len(shown):])


def serve(args: argparse.Namespace) -> None:
    """The OpenAI-compatible server of `bitsmith serve`, from the runtime alone."""
    from bitsmith.runtime.engine import Engine
    from bitsmith.runtime.runners import open_runner
    from bitsmith.runtime.server import Server

    artifact = load_artifact(args.artifact)
    tokenizer = artifact.tokenizer()
    engine = Engine(open_runner(artifact), tokenizer)
    name = args.model_name or Path(args.artifact).resolve().name
    server = Server(engine, tokenizer, name, artifact.manifest["tokenizer"].get("chat_template"), args.host,
                    args.port, args.max_pending)
    print(f"serving {name} on http://{args.host}:{server.port}", file=sys.stderr, flush=True)

    def stop(*_: Any) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever()


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m bitsmith.runtime",
                                  description="Run or serve a compiled bitsmith artifact with the runtime alone.")
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="generate a continuation of PROMPT")
    run.add_argument("artifact", type=Path)
    run.add_argument("prompt")
    run.add_argument("--max-tokens", type=int, default=64)
    run.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding")
    run.add_argument("--top-k", type=int, default=0)
    run.add_argument("--top-p", type=float, default=1.0)
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--chat", action="store_true", help="wrap PROMPT with the model's chat template")
    run.add_argument("--json", action="store_true", help='print {"text": ..., "token_ids": [...]}')
    run.set_defaults(func=run_prompt)
    srv = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API")
    srv.add_argument("artifact", type=Path)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    srv.add_argument("--max-pending", type=int, default=64)
    srv.add_argument("--model-name", default=None)
    srv.set_defaults(func=serve)
    return top


def main(argv: list[str] | None = None) -> int:
    runtime_library_only()  # this process never compiles: TVM's runtime library alone
    args = parser().parse_args(argv)
    try:
        args.func(args)
    except BitsmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
