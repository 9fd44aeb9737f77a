"""The compile pipeline: load a model, run the phased pass list, write the artifact."""

from __future__ import annotations

import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.target import DEFAULT_CUDA_ARCH, resolve_target, target_key
from bitsmith.compiler.artifact import SPILL, staging_directory, write_artifact
from bitsmith.compiler.calibration_data import calibration_tokens
from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.ir import Module
from bitsmith.compiler.loader import load_model
from bitsmith.compiler.weight_store import WeightStore
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions  # noqa: F401 (re-exported)
from bitsmith.passes.assign_precision import KEEP_SCHEMES, AssignPrecision, matches_pattern
from bitsmith.passes.base import PassContext
from bitsmith.passes.canonicalize import CANONICALIZE
from bitsmith.passes.cast_weights import STORAGE_DTYPES, CastWeights
from bitsmith.passes.choose_rotations import ChooseRotations
from bitsmith.passes.eliminate_dead_code import EliminateDeadCode
from bitsmith.passes.expert_usage import MeasureExpertUsage, has_experts
from bitsmith.passes.find_outlier_channels import FindOutlierChannels
from bitsmith.passes.fold_norm_scales import FoldNormScales
from bitsmith.passes.kv_plan import KVPlanOptions, parse_bytes
from bitsmith.passes.learn_rotations import LearnRotations
from bitsmith.passes.lower_to_kernels import LowerToKernels
from bitsmith.passes.manager import Pass, is_traced, run_passes
from bitsmith.passes.pack_weights import PackWeights
from bitsmith.passes.plan_kv_cache import PlanKVCache
from bitsmith.passes.quantize_weights import QuantizeWeights
from bitsmith.passes.rotate_ffn_online import RotateFFNOnline
from bitsmith.passes.rotate_heads import RotateHeads
from bitsmith.passes.rotate_keys_online import RotateKeysOnline
from bitsmith.passes.rotate_residual import RotateResidual
from bitsmith.passes.untie_lm_head import LM_HEAD, UntieLmHead
from bitsmith.runtime.schedule import KernelPlan

DEFAULT_KERNEL_CONTEXT = 2048


# ---------------------------------------------------------------------------------------------- the pipeline
@dataclass(frozen=True)
class Step:
    """A pass in a phase, in the list when its condition (a CONDITIONS key) holds; `build` makes it from the
    options and the model (default: the pass class with no arguments)."""

    phase: str
    kind: type[Pass]
    when: str = "always"
    build: Callable[[CompileOptions, LoadedModel], Pass] | None = None


CONDITIONS: dict[str, Callable[[CompileOptions, LoadedModel], bool]] = {
    "always": lambda o, m: True,
    "traced input": lambda o, m: is_traced(m.module),  # torch.export / ONNX: prefill alone
    "canonical input": lambda o, m: not is_traced(m.module),  # hand-built frontends: prefill and decode
    "lm_head quantized": lambda o, m: quantizes_lm_head(o) or LM_HEAD in imported_schemes(o, m),
    "quantizing": lambda o, m: o.quant.enabled or bool(imported_schemes(o, m)),
    "kernels": lambda o, m: o.target.name != "none",
    "rotating": lambda o, m: o.rotation.enabled,
    "rotating (hadamard)": lambda o, m: o.rotation.kind == "hadamard",
    "rotating (learned)": lambda o, m: o.rotation.kind == "learned",
    "rotating heads": lambda o, m: o.rotation.enabled and o.rotation.heads,
    "rotating ffn": lambda o, m: o.rotation.enabled and o.rotation.ffn,
    "rotating keys": lambda o, m: o.rotation.enabled and o.rotation.keys,
    # a quantized mixture of experts (known once loaded; no line in the model-less pass list)
    "quantizing experts": lambda o, m: o.quant.enabled and m is not None and has_experts(m.module),
}
MODEL_CONDITIONS = ("traced input", "canonical input")  # known once the model is loaded


def _assign_precision(o: CompileOptions, m: LoadedModel) -> Pass:
    return AssignPrecision(o.quant.default_scheme(), o.quant.keep_default, o.quant.keep, o.quant.schemes,
                           imported=tuple(sorted(imported_schemes(o, m).items())),
                           # an import with only --scheme patterns requantizes what they name, nothing else
                           quantize_rest=o.quant.enabled and (o.quant.method is not None or not imported_schemes(o, m)))


def _learn_rotations(o: CompileOptions, m: LoadedModel) -> Pass:
    """--rotate learned: R1/R2 optimised on the calibration tokens against the RTN error of what the precision plan
    will quantize (the plan is computed here as assign_precision will)."""
    return LearnRotations(o.rotation.seed, o.rotation.learn_steps, o.rotation.learn_lr, _assign_precision(o, m),
                          ffn_online=o.rotation.ffn, heads=o.rotation.heads, max_rank=o.rotation.learn_rank)


def _plan_kv_cache(o: CompileOptions, m: LoadedModel) -> Pass:
    mem = o.memory
    return PlanKVCache(KVPlanOptions(parse_bytes(mem.budget), kernel_context(o, m), mem.concurrency, mem.kv_dtype,
                                     mem.block_size, device=mem.device))


def _lower_to_kernels(o: CompileOptions, m: LoadedModel) -> Pass:
    # on every target an op without a kernel fails the compile; --target none (no kernels) is the only way to an
    # artifact for the reference executor
    return LowerToKernels(int8_activations=use_int8_activations(o), target=kernel_target(o))


PIPELINE: tuple[Step, ...] = (
    *(Step("canonicalize", kind, "traced input") for kind in CANONICALIZE),
    Step("canonicalize", EliminateDeadCode, "canonical input"),
    Step("rotate", FindOutlierChannels, "rotating", lambda o, m: FindOutlierChannels(o.rotation.outlier_ratio)),
    Step("rotate", FoldNormScales, "rotating"),
    Step("rotate", ChooseRotations, "rotating (hadamard)", lambda o, m: ChooseRotations(o.rotation.seed)),
    Step("rotate", LearnRotations, "rotating (learned)", _learn_rotations),
    Step("rotate", RotateResidual, "rotating"),
    Step("rotate", RotateHeads, "rotating heads"),
    Step("rotate", RotateFFNOnline, "rotating ffn", lambda o, m: RotateFFNOnline(o.rotation.seed)),
    Step("rotate", RotateKeysOnline, "rotating keys", lambda o, m: RotateKeysOnline(o.rotation.seed)),
    Step("precision", UntieLmHead, "lm_head quantized"),
    Step("precision", MeasureExpertUsage, "quantizing experts"),
    Step("precision", AssignPrecision, "quantizing", _assign_precision),
    Step("quantize/pack", QuantizeWeights, "quantizing", lambda o, m: QuantizeWeights(clip=o.quant.clip)),
    Step("quantize/pack", CastWeights, "always", lambda o, m: CastWeights(storage_dtype(o, m))),
    Step("quantize/pack", PackWeights, "quantizing"),
    Step("memory plan", PlanKVCache, "always", _plan_kv_cache),
    Step("lower", LowerToKernels, "kernels", _lower_to_kernels),
)


def pipeline_steps(options: CompileOptions, model: LoadedModel | None = None) -> list[tuple[Step, str | None]]:
    """The steps these options (and the model, when given) put in the list, each with the model condition
    it still waits on (None: it is in)."""
    steps = []
    for step in PIPELINE:
        if model is None and step.when in MODEL_CONDITIONS:
            steps.append((step, step.when))
        elif CONDITIONS[step.when](options, model):
            steps.append((step, None))
    return steps


def default_passes(options: CompileOptions, model: LoadedModel) -> list[Pass]:
    """The ordered pass list for these options and this model."""
    return [step.build(options, model) if step.build else step.kind() for step, _ in pipeline_steps(options, model)]


def describe_pipeline(options: CompileOptions, model: LoadedModel | None = None) -> str:
    """The pass list by phase, one line each; without a model, passes that depend on its kind say which."""
    phases: dict[str, list[tuple[str | None, list[str]]]] = {}
    for step, waits in pipeline_steps(options, model):
        groups = phases.setdefault(step.phase, [])
        if not groups or groups[-1][0] != waits:
            groups.append((waits, []))
        groups[-1][1].append(step.kind.name)
    width = max(map(len, phases)) + 2
    lines = []
    for phase, groups in phases.items():
        for index, (waits, names) in enumerate(groups):
            text = (f"{waits}: " if waits else "") + ", ".join(names)
            wrapped = textwrap.wrap(text, 100 - width, subsequent_indent="  ", break_on_hyphens=False)
            lines += [f"{phase if index == 0 and i == 0 else '':<{width}}{part}" for i, part in enumerate(wrapped)]
    return "\n".join(lines)


def run_pipeline(model: LoadedModel, options: CompileOptions, log: Callable[[str], None] | None = None,
                 spill_dir: Path | None = None) -> tuple[Module, PassContext]:
    """Run the pass list on a loaded model: (the compiled module, the context with its weights and results).
    With `spill_dir`, the weights passes write go there (see weight_store.py), so memory stays bounded."""
    passes = default_passes(options, model)
    if log:
        log("passes:\n" + "\n".join(f"  {line}" for line in describe_pipeline(options, model).splitlines()))
    ctx = PassContext(WeightStore(model.weights, spill_dir))
    if imported_schemes(options, model):
        ctx.imported = {name: (qw, model.quantized_types.get(name, model.source.get("format", "imported")))
                        for name, qw in model.quantized.items()}
    if options.quant.enabled or options.rotation.enabled:  # rotations measure outlier channels (and learn) on them
        ctx.calibration = calibration_tokens(model, options.quant.calibration)
    module = run_passes(model.module, ctx, passes, options.verify, options.dump_ir, log)
    if log and ctx.lowered is not None and ctx.lowered.float_activations:
        floats = ctx.lowered.float_activations
        log(f"int8 activations: {len(floats)} matmuls keep float32 activations (their weights' forms have no "
            "int8-activation kernel): " + "; ".join(f"{name} ({why})" for name, why in sorted(floats.items())))
    return module, ctx


# ---------------------------------------------------------------------------------------- what options mean
def imported_schemes(options: CompileOptions, model: LoadedModel | None) -> dict[str, str]:
    """The weights a pre-quantized source gave codes for, each with its scheme's name ({} with --requantize)."""
    if model is None or options.quant.requantize:
        return {}
    return {name: qw.scheme.name for name, qw in getattr(model, "quantized", {}).items()}


def storage_dtype(options: CompileOptions, model: LoadedModel) -> str:
    """--dtype, else 16-bit for what a quantized artifact keeps dense, else the checkpoint's own dtype."""
    if options.dtype:
        return options.dtype
    if options.quant.enabled or imported_schemes(options, model):
        return "bfloat16" if model.dtype == "bfloat16" else "float16"
    return model.dtype if model.dtype in STORAGE_DTYPES else "float32"


def quantizes_lm_head(options: CompileOptions) -> bool:
    """A --scheme override (not a keep) names the lm_head: a tied one is then untied first."""
    return any(matches_pattern(pattern, LM_HEAD) for pattern, scheme in options.quant.schemes
               if scheme not in KEEP_SCHEMES)


def kernel_target(options: CompileOptions) -> str:
    """The codegen target name: host, aarch64-linux[:<cpu>[+feature...]] or cuda_<arch>."""
    target = options.target
    if target.name == "cuda":
        return f"cuda_{target.arch or DEFAULT_CUDA_ARCH}"
    if target.arch is not None:
        raise BitsmithError(f"--arch {target.arch} is only for --target cuda (the target is {target.name})",
                            where="compile options", fix="drop --arch, or add --target cuda")
    if (target.cpu or target.features) and target.name != "aarch64-linux":
        raise BitsmithError(f"--cpu / --features are for --target aarch64-linux (the target is {target.name})",
                            where="compile options", fix="drop them (host uses this CPU's exact LLVM name)")
    return target_key(target.name, target.cpu, target.features)


def use_int8_activations(options: CompileOptions) -> bool:
    """int8 activations for 4/8-bit GEMVs, asked for or `auto`: the lowering uses them where its target supports
    them (Target.supports_int8_activations); asked for on a target without them, refused here."""
    if options.target.activations == "float32" or options.target.name == "none":
        return False
    if options.target.activations == "int8" and not resolve_target(kernel_target(options)).supports_int8_activations:
        tgt = resolve_target(kernel_target(options))
        raise BitsmithError(f"--activations int8 needs {tgt.int8_requirement}, which target {options.target.name} "
                            f"({tgt.mcpu}) lacks", where="compile options",
                            fix="use --activations float32 (or auto)" + (
                                "; or --cpu with dotprod (e.g. cortex-a76, Raspberry Pi 5)" if tgt.arch == "aarch64" else ""))
    return True


def kernel_context(options: CompileOptions, model: LoadedModel) -> int:
    """--context, else the model's maximum capped at DEFAULT_KERNEL_CONTEXT (the fp32 cache grows with it)."""
    limit = int(model.config.get("max_position", DEFAULT_KERNEL_CONTEXT))
    context = options.memory.context
    if context is None:
        return max(16, min(limit, DEFAULT_KERNEL_CONTEXT) // 16 * 16)
    if context % 16:  # keeps every layer's cache slice 64-byte aligned for the kernels
        raise BitsmithError(f"--context {context} is not a multiple of 16", where="compile options",
                            fix=f"use --context {context // 16 * 16 or 16}")
    if context > limit:
        raise BitsmithError(f"--context {context} exceeds the model's maximum of {limit} positions",
                            where="compile options", fix=f"use --context {limit} or less")
    return context


def compile_model(source: str | Path | None, out: str | Path, options: CompileOptions,
                  log: Callable[[str], None] | None = None) -> Path:
    """Compile `source` (None: the built-in default model) into an artifact directory at `out`."""
    kernel_target(options)  # refuse a bad target/arch pair before any work
    model = load_model(source, tokenizer=options.tokenizer, log=log)
    with staging_directory(out) as staging, tempfile.TemporaryDirectory(prefix="bitsmith-kernels-") as tmp:
        module, ctx = run_pipeline(model, options, log, spill_dir=staging / SPILL)
        kernels, files = build_kernels(ctx, kernel_target(options), Path(tmp), log)
        return write_artifact(out, module, ctx.weights, model.tokenizer, model.config, options.to_json(), model.source,
                              kernels=kernels, extra_files=files, memory_plan=memory_plan(ctx, kernels),
                              staging=staging)


def memory_plan(ctx: PassContext, kernels: dict | None) -> dict[str, int]:
    """weights + KV cache + workspace = total bytes; the workspace is the largest schedule arena when
    kernels exist (else the estimate the KV plan used)."""
    plan = dict(ctx.memory_estimate)
    if kernels:
        plan["workspace"] = max(s["arena_bytes"] for s in kernels["schedules"].values())
    plan["total"] = plan["weights"] + plan["kv_cache"] + plan["workspace"]
    return plan


def build_kernels(ctx: PassContext, target: str, workdir: Path,
                  log: Callable[[str], None] | None) -> tuple[dict | None, dict[str, Path]]:
    """Build the lowered schedules' kernels into workdir; (manifest `kernels` entry, artifact files)."""
    lowered = ctx.lowered
    if lowered is None:  # --target none: the artifact runs on the reference executor only, as asked
        if log:
            log("no kernels (--target none): run it with `bitsmith run ... --executor reference`")
        return None, {}
    tgt = resolve_target(target)
    library = f"kernels/{tgt.name}.so"
    report = build_kernel_library(lowered.specs.values(), tgt, workdir / library, log=log)
    model = str(tgt.tvm["arch"]) if tgt.is_gpu else tgt.mcpu  # the exact chip the code is for
    plan = KernelPlan(tgt.name, library, tgt.arch, model, lowered.schedules, lowered.constants, lowered.kv)
    entry = plan.to_json()
    entry["build"] = {"kernels": report.kernels, "built": report.built, "cached": report.cached,
                      "seconds": round(report.seconds, 2)}
    return entry, {library: workdir / library}
