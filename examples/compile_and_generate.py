"""Compile a model into an artifact and generate from it with the Python API (what the CLI does)."""

from __future__ import annotations

import argparse

from bitsmith.pipeline import CompileOptions, compile_model
from bitsmith.tools.run import run_prompt
from bitsmith.runtime.sampling import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", default=None, help="model path (default: SmolLM2-135M-Instruct)")
    parser.add_argument("-o", "--output", default="artifact")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    artifact = compile_model(args.model, args.output, CompileOptions(), log=print)
    text, ids = run_prompt(artifact, args.prompt, args.max_tokens, SamplingParams(temperature=0.0))
    print(f"{args.prompt}{text}\n({len(ids)} tokens)")


if __name__ == "__main__":
    main()
