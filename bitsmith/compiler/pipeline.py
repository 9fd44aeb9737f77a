"""The compile pipeline: load a model, run the ordered pass list, write the artifact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_samples, read_calibration_text
from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.compiler.printer import print_module
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import AssignPrecision
from bitsmith.passes.base import Pass, PassContext
from bitsmith.passes.cast_weights import CastWeights
from bitsmith.passes.eliminate_dead_code import EliminateDeadCode
from bitsmith.passes.pack_weights import PackWeights
from bitsmith.passes.quant.scheme import QuantScheme
from bitsmith.passes.quantize_weights import QuantizeWeights
from bitsmith.runtime.tokenizer import tokenizer_from_spec


@dataclass(frozen=True)
class CompileOptions:
    """Everything `bitsmith compile` can be told; serialised into the manifest."""

    dtype: str | None = None  # None: the checkpoint's own storage dtype
    tokenizer: str | None = None  # llama2.c: tok*.bin path when it is not beside the checkpoint
    verify: bool = True  # run the IR verifier after every pass
    dump_ir: str | None = None  # directory for the IR after each pass, numbered
    # quantization (method None: no quantization)
    method: str | None = None  # "rtn" | "gptq" | "awq"
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    keep_default: bool = True  # lm_head and the first and last decoder layers stay 16-bit
    keep: tuple[str, ...] = ()  # weight-name patterns forced to 16-bit
    schemes: tuple[tuple[str, str], ...] = ()  # (pattern, scheme string) overrides, e.g. ("mlp.down_proj", "int8")
    calibration: CalibrationOptions = CalibrationOptions()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def quantize(self) -> bool:
        return self.method is not None or bool(self.schemes)

    def default_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym, self.method or "rtn")


def storage_dtype(options: CompileOptions, model: LoadedModel) -> str:
    """--dtype, else 16-bit for what a quantized artifact keeps dense, else the checkpoint's own dtype."""
    if options.dtype:
        return options.dtype
    if options.quantize:
        return "bfloat16" if model.dtype == "bfloat16" else "float16"
    return model.dtype if model.dtype in ("float32", "float16", "bfloat16") else "float32"


def default_passes(options: CompileOptions, model: LoadedModel) -> list[Pass]:
    """The ordered pass list: clean up, decide precision, quantize, cast what stays dense, pack."""
    passes: list[Pass] = [EliminateDeadCode()]
    if options.quantize:
        passes += [AssignPrecision(options.default_scheme(), options.keep_default, options.keep, options.schemes),
                   QuantizeWeights()]
    passes.append(CastWeights(storage_dtype(options, model)))
    if options.quantize:
        passes.append(PackWeights())
    return passes


def calibration_tokens(model: LoadedModel, options: CalibrationOptions) -> np.ndarray | None:
    """Calibration samples tokenized with the model's own tokenizer (None without a tokenizer)."""
    if model.tokenizer is None:
        return None
    tokenizer = tokenizer_from_spec(model.tokenizer)
    where = options.path or "built-in calibration text"
    ids = tokenizer.encode(read_calibration_text(options.path), add_bos=False)
    return calibration_samples(ids, options, tokenizer.bos_token_id if tokenizer.add_bos else None, where)


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
    if options.quantize:
        ctx.calibration = calibration_tokens(model, options.calibration)
    module = run_passes(model.module, ctx, default_passes(options, model), options.verify, options.dump_ir, log)
    return write_artifact(out, module, ctx.weights, model.tokenizer, model.config, options.to_json(), model.source)
