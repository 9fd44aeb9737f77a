"""The compile pipeline: load a model, run the ordered pass list, write the artifact."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_tokens
from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.compiler.printer import print_module
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.assign_precision import KEEP_SCHEMES, AssignPrecision, matches_pattern
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.passes.base import Pass, PassContext
from bitsmith.passes.cast_weights import CastWeights
from bitsmith.passes.eliminate_dead_code import EliminateDeadCode
from bitsmith.passes.kv_plan import KVPlanOptions, parse_bytes
from bitsmith.passes.lower_to_kernels import LowerToKernels
from bitsmith.passes.pack_weights import PackWeights
from bitsmith.passes.plan_kv_cache import PlanKVCache
from bitsmith.passes.quant.scheme import QuantScheme
from bitsmith.passes.quantize_weights import QuantizeWeights
from bitsmith.passes.untie_lm_head import LM_HEAD, UntieLmHead

DEFAULT_KERNEL_CONTEXT = 2048


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
    # compiled kernels
    target: str = "host"  # "host" | "aarch64-linux" | "cuda" | "none" (reference executor only)
    arch: str | None = None  # CUDA SM architecture for target "cuda" (None: sm_90a)
    context: int | None = None  # longest sequence (None: min(model max, 2048))
    # KV cache plan
    memory: str | None = None  # total budget, e.g. "2GB": weights + KV cache + workspace
    concurrency: int = 4  # sequences served at once, each up to `context` tokens
    kv_dtype: str = "auto"  # auto | float16 | int8 | float32 (auto: float16 unless the budget needs int8)
    block_size: int = 16
    activations: str = "float32"  # quantized GEMV inputs: float32 (exact) | int8 (VNNI, bandwidth-bound) | auto

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
    if options.quantize and quantizes_lm_head(options):
        passes.append(UntieLmHead())
    if options.quantize:
        passes += [AssignPrecision(options.default_scheme(), options.keep_default, options.keep, options.schemes),
                   QuantizeWeights()]
    passes.append(CastWeights(storage_dtype(options, model)))
    if options.quantize:
        passes.append(PackWeights())
    passes.append(PlanKVCache(KVPlanOptions(parse_bytes(options.memory), kernel_context(options, model),
                                            options.concurrency, options.kv_dtype, options.block_size)))
    if options.target != "none":
        # on the host an op without a kernel falls back to the reference executor; elsewhere it is an error
        passes.append(LowerToKernels(required=options.target != "host",
                                     int8_activations=use_int8_activations(options), target=kernel_target(options)))
    return passes


def quantizes_lm_head(options: CompileOptions) -> bool:
    """A --scheme override (not a keep) names the lm_head: a tied one is then untied first."""
    return any(matches_pattern(pattern, LM_HEAD) for pattern, scheme in options.schemes if scheme not in KEEP_SCHEMES)


def kernel_target(options: CompileOptions) -> str:
    """The codegen target name: host, aarch64-linux or cuda_<arch>."""
    if options.target == "cuda":
        from bitsmith.codegen.target import DEFAULT_CUDA_ARCH

        return f"cuda_{options.arch or DEFAULT_CUDA_ARCH}"
    if options.arch is not None:
        raise BitsmithError(f"--arch {options.arch} is only for --target cuda (the target is {options.target})",
                            where="compile options", fix="drop --arch, or add --target cuda")
    return options.target


def use_int8_activations(options: CompileOptions) -> bool:
    """int8 activations for 4/8-bit GEMVs, asked for or `auto`: the lowering uses them where its target supports
    them (Target.supports_int8_activations); asked for on a target without them, refused here."""
    if options.activations == "float32" or options.target == "none":
        return False
    from bitsmith.codegen.target import resolve_target

    if options.activations == "int8" and not resolve_target(kernel_target(options)).supports_int8_activations:
        raise BitsmithError(f"--activations int8 needs AVX-512 VNNI, which target {options.target} lacks",
                            where="compile options", fix="use --activations float32 (or auto)")
    return True


def kernel_context(options: CompileOptions, model: LoadedModel) -> int:
    """--context, else the model's maximum capped at DEFAULT_KERNEL_CONTEXT (the fp32 cache grows with it)."""
    limit = int(model.config.get("max_position", DEFAULT_KERNEL_CONTEXT))
    if options.context is None:
        return max(16, min(limit, DEFAULT_KERNEL_CONTEXT) // 16 * 16)
    if options.context % 16:  # keeps every layer's cache slice 64-byte aligned for the kernels
        raise BitsmithError(f"--context {options.context} is not a multiple of 16", where="compile options",
                            fix=f"use --context {options.context // 16 * 16 or 16}")
    if options.context > limit:
        raise BitsmithError(f"--context {options.context} exceeds the model's maximum of {limit} positions",
                            where="compile options", fix=f"use --context {limit} or less")
    return options.context


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
    kernel_target(options)  # refuse a bad target/arch pair before any work
    from bitsmith.compiler.artifact import write_artifact
    from bitsmith.compiler.loader import load_model

    model = canonical_model(load_model(source, tokenizer=options.tokenizer, log=log))
    ctx = PassContext(dict(model.weights))
    if options.quantize:
        ctx.calibration = calibration_tokens(model, options.calibration)
    module = run_passes(model.module, ctx, default_passes(options, model), options.verify, options.dump_ir, log)
    with tempfile.TemporaryDirectory(prefix="bitsmith-kernels-") as tmp:
        kernels, files = build_kernels(ctx, kernel_target(options), Path(tmp), log)
        return write_artifact(out, module, ctx.weights, model.tokenizer, model.config, options.to_json(), model.source,
                              kernels=kernels, extra_files=files, memory_plan=memory_plan(ctx, kernels))


def memory_plan(ctx: PassContext, kernels: dict | None) -> dict[str, int]:
    """weights + KV cache + workspace = total bytes; the workspace is the largest schedule arena when
    kernels exist (else the estimate the KV plan used)."""
    plan = dict(ctx.notes["memory_estimate"])
    if kernels:
        plan["workspace"] = max(s["arena_bytes"] for s in kernels["schedules"].values())
    plan["total"] = plan["weights"] + plan["kv_cache"] + plan["workspace"]
    return plan


def build_kernels(ctx: PassContext, target: str, workdir: Path,
                  log: Callable[[str], None] | None) -> tuple[dict | None, dict[str, Path]]:
    """Build the lowered schedules' kernels into workdir; (manifest `kernels` entry, artifact files)."""
    lowered = ctx.notes.get("kernels")
    if lowered is None:
        if log and "kernels_skipped" in ctx.notes:
            log(f"kernels skipped ({ctx.notes['kernels_skipped']}); `bitsmith run` uses the reference executor")
        return None, {}
    from bitsmith.codegen.build import build_kernel_library
    from bitsmith.codegen.target import resolve_target
    from bitsmith.runtime.schedule import KernelPlan

    tgt = resolve_target(target)
    library = f"kernels/{tgt.name}.so"
    report = build_kernel_library(lowered["specs"].values(), tgt, workdir / library, log=log)
    model = str(tgt.tvm["arch"]) if tgt.is_gpu else tgt.mcpu  # the exact chip the code is for
    plan = KernelPlan(tgt.name, library, tgt.arch, model, lowered["schedules"], lowered["constants"],
                      lowered["kv"])
    entry = plan.to_json()
    entry["build"] = {"kernels": report.kernels, "built": report.built, "cached": report.cached,
                      "seconds": round(report.seconds, 2)}
    return entry, {library: workdir / library}
