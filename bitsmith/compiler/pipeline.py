"""The compile pipeline: load a model, run the ordered pass list, write the artifact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.compiler.printer import print_module
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import Pass, PassContext
from bitsmith.passes.cast_weights import CastWeights
from bitsmith.passes.eliminate_dead_code import EliminateDeadCode


@dataclass(frozen=True)
class CompileOptions:
    """Everything `bitsmith compile` can be told; serialised into the manifest."""

    dtype: str | None = None  # None: the checkpoint's own storage dtype
    tokenizer: str | None = None  # llama2.c: tok*.bin path when it is not beside the checkpoint
    verify: bool = True  # run the IR verifier after every pass
    dump_ir: str | None = None  # directory for the IR after each pass, numbered

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def default_passes(options: CompileOptions, model: LoadedModel) -> list[Pass]:
    """The ordered pass list. Later phases (calibrate, quantize, pack, plan KV, lower) append here."""
    dtype = options.dtype or model.dtype
    if dtype not in ("float32", "float16", "bfloat16"):
        dtype = "float32"
    return [EliminateDeadCode(), CastWeights(dtype)]


def run_passes(module: Module, ctx: PassContext, passes: list[Pass], verify: bool = True,
               dump_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> Module:
    """Run `passes` in order, verifying after each and dumping the IR when asked."""
    dump = Path(dump_dir) if dump_dir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00-input.ir").write_text(print_module(module))
    if verify:
        verify_module(module)
    for index, p in enumerate(passes, start=1):
        if log:
            log(f"pass {p.name}")
        try:
            module = p.run(module, ctx)
        except BitsmithError as exc:
            if exc.where is None or "pass" not in exc.where:
                exc.where = f"pass {p.name}" + (f", {exc.where}" if exc.where else "")
            raise
        if verify:
            verify_module(module)
        if dump:
            (dump / f"{index:02d}-{p.name}.ir").write_text(print_module(module))
    return module


def compile_model(source: str | Path | None, out: str | Path, options: CompileOptions,
                  log: Callable[[str], None] | None = None) -> Path:
    """Compile `source` (None: the built-in default model) into an artifact directory at `out`."""
    from bitsmith.compiler.artifact import write_artifact
    from bitsmith.compiler.loader import load_model

    model = load_model(source, tokenizer=options.tokenizer, log=log)
    ctx = PassContext(dict(model.weights))
    module = run_passes(model.module, ctx, default_passes(options, model), options.verify, options.dump_ir, log)
    return write_artifact(out, module, ctx.weights, model.tokenizer, model.config, options.to_json(), model.source)
