"""Compile options, by concern, and the choices that exist only here (the CLI takes the others from the modules
that define them).

Kept apart from pipeline.py so that the command line parses them without importing TVM (the pipeline loads it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from bitsmith.codegen.target import SUPPORTED_TARGETS
from bitsmith.compiler.calibration_data import CalibrationOptions
from bitsmith.errors import BitsmithError
from bitsmith.passes.kv_plan import KV_DTYPES
from bitsmith.runtime.quant_scheme import QuantScheme

KV_DTYPE_CHOICES = ("auto", *KV_DTYPES)  # auto: float16 unless the budget needs int8, then int4
TARGETS = (*SUPPORTED_TARGETS, "cuda", "none")  # none: the reference executor only
ACTIVATIONS = ("float32", "int8", "auto")  # inputs of the quantized GEMVs
CLIP_MODES = ("none", "mse")  # QuantOptions.clip
CLIPPED_METHODS = ("rtn", "gptq")  # the methods --clip mse acts on


@dataclass(frozen=True)
class QuantOptions:
    """Which weights are quantized, and how (method None and no schemes: none are)."""

    method: str | None = None  # "rtn" | "gptq" | "awq"
    bits: int = 4
    group_size: int = 128  # -1: per output channel
    sym: bool = True
    keep_default: bool = True  # lm_head and the first and last decoder layers stay 16-bit
    keep: tuple[str, ...] = ()  # weight-name patterns forced to 16-bit
    schemes: tuple[tuple[str, str], ...] = ()  # (pattern, scheme string) overrides, e.g. ("mlp.down_proj", "int8")
    calibration: CalibrationOptions = CalibrationOptions()
    requantize: bool = False  # pre-quantized sources: dequantize and quantize again instead of keeping the codes
    clip: str = "none"  # "mse": RTN/GPTQ group ranges clipped where that lowers the weight's rounding error

    def __post_init__(self) -> None:
        if self.clip not in CLIP_MODES:
            raise BitsmithError(f"unknown clip mode {self.clip!r}", where="quant options",
                                fix=f"use one of {CLIP_MODES}")
        if self.clip != "none" and self.method not in CLIPPED_METHODS:
            # awq searches its own clip and hqq fits its own scales: a clip they ignore must not pass silently
            raise BitsmithError(f"--clip {self.clip} applies to --method {' or '.join(CLIPPED_METHODS)}, "
                                f"not {self.method or 'no --method'}", where="quant options",
                                fix=f"drop --clip, or quantize with --method {' or '.join(CLIPPED_METHODS)}")

    @property
    def enabled(self) -> bool:
        return self.method is not None or bool(self.schemes)

    def default_scheme(self) -> QuantScheme:
        return QuantScheme(self.bits, self.group_size, self.sym, self.method or "rtn")


@dataclass(frozen=True)
class MemoryOptions:
    """The KV-cache plan: how long, how many sequences at once, in what budget."""

    context: int | None = None  # longest sequence (None: min(model max, 2048))
    budget: str | None = None  # total memory, e.g. "2GB": weights + KV cache + workspace
    concurrency: int = 4  # sequences served at once, each up to `context` tokens
    kv_dtype: str = "auto"  # auto | float16 | int8 | int4 | float32 (auto: float16, int8, then int4 as the budget needs)
    block_size: int = 16
    device: str = ""  # --device: the profile the budget came from, e.g. "raspberry-pi-4 (4.0 GiB RAM, ...)"


@dataclass(frozen=True)
class TargetOptions:
    """Where the compiled kernels run."""

    name: str = "host"  # "host" | "aarch64-linux" | "cuda" | "none" (reference executor only)
    arch: str | None = None  # CUDA SM architecture for target "cuda" (None: sm_90a)
    activations: str = "float32"  # quantized GEMV inputs: float32 (exact) | int8 (VNNI, bandwidth-bound) | auto
    cpu: str | None = None  # aarch64-linux: LLVM CPU name (cortex-a76: +dotprod, int8 GEMVs with sdot); None: generic
    features: tuple[str, ...] = ()  # aarch64-linux: extra LLVM features, e.g. ("dotprod", "i8mm")


@dataclass(frozen=True)
class GateOptions:
    """The quality gate a compile must pass (tools/gate.py, tools/ladder.py); spec None: no gate."""

    spec: str | None = None  # "kld<=0.05,golden>=0.9" | "default" | "auto" (default when quantizing) | None
    tokens: int = 512  # ppl: tokens of the held-out text scored (2 windows of 256: the reference runs in numpy)
    limit: int | None = 8  # golden/json: the first N prompts
    max_tokens: int = 32  # golden: greedy tokens per prompt
    ladder: bool = True  # on failure, try the fallback ladder (else fail at once)
    # the ladder's per-tensor sensitivity: one numpy forward per tensor over these tokens (SmolLM2: 196 tensors)
    sensitivity_samples: int = 1
    sensitivity_seqlen: int = 64


ROTATIONS = ("none", "hadamard", "learned")


@dataclass(frozen=True)
class RotationOptions:
    """Orthogonal rotations before quantization (passes rotate_*: QuaRot/SpinQuant-style); kind none: no pass runs.

    hadamard: R1 (residual stream, folded into the embedding, every linear that reads or writes the residual and
    the lm_head) is a randomized Hadamard matrix from `seed`; learned: R1/R2 start there and are optimised on the
    calibration tokens under orthogonality (Cayley updates, `learn_steps` of them)."""

    kind: str = "none"  # none | hadamard | learned
    seed: int = 0  # the random signs of the randomized Hadamard R1 (and R2)
    heads: bool = True  # R2: a per-head rotation folded into v_proj rows and o_proj columns
    ffn: bool = True  # R4: an online Hadamard before down_proj (its columns rotated to match)
    keys: bool = True  # R3: an online Hadamard on q and k after RoPE, so the KV cache stores rotated keys
    # find_outlier_channels: residual channels whose mean square exceeds this times the median's stay unrotated
    outlier_ratio: float = 100.0
    learn_steps: int = 100  # learned: Cayley optimiser steps
    learn_lr: float = 1.5  # learned: the Cayley step size
    # learned: each linear input's X^T X is kept as a rank <= this factor (+ an isotropic tail): in * rank floats
    learn_rank: int = 512

    @property
    def enabled(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class CompileOptions:
    """Everything `bitsmith compile` can be told, by concern; serialised into the manifest (nested dicts)."""

    dtype: str | None = None  # None: the checkpoint's own storage dtype
    tokenizer: str | None = None  # llama2.c: tok*.bin path when it is not beside the checkpoint
    verify: bool = True  # run the IR verifier after every pass
    dump_ir: str | None = None  # directory for the IR (and side tables) after each pass, numbered
    quant: QuantOptions = QuantOptions()
    memory: MemoryOptions = MemoryOptions()
    target: TargetOptions = TargetOptions()
    gate: GateOptions = GateOptions()
    rotation: RotationOptions = RotationOptions()

    def to_json(self) -> dict:
        return dataclasses.asdict(self)
