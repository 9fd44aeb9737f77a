"""Compilation targets: the host CPU by its exact LLVM name, an aarch64 cross target, or an NVIDIA GPU (CUDA);
each says which kernel families, weight dtypes and activation modes it builds (`Target.check`)."""

from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from bitsmith.codegen.spec_checks import DENSE_BITS, refuse  # not common.py: this module must load without TVM
from bitsmith.errors import BitsmithError

# TVM is imported by the functions that use it: the compile options and the CLI read these constants.
SUPPORTED_TARGETS = ("host", "aarch64-linux")
# SM architectures nvcc builds CUDA kernels for ("a": the arch-specific features of that exact chip)
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
DEFAULT_CUDA_ARCH = "sm_90a"

# widest SIMD register each feature implies, in bytes (checked widest first)
_VECTOR_FEATURES = (("avx512f", 64), ("avx2", 32), ("avx", 32), ("sve", 16), ("neon", 16), ("sse2", 16))
# nsz lets LLVM drop `0.0 + x` (a reduction's first step becomes an FMA); reassoc lets it turn the
# per-row horizontal sums into shuffle trees (a faster GEMV, bench/kernels.md). Summation order
# changes within fp32 rounding; no nnan/ninf/arcp.
_FAST_MATH = {"fast-math-nsz": True, "fast-math-reassoc": True}

# What targets build, by kernel family (the spec's class name, as in kernel.describe). GPUs have every
# family but the int8-activation matmuls, which need AVX-512 VNNI.
GPU_FAMILIES = ("GemvSpec", "GemmSpec", "PagedAttentionSpec", "BinarySpec", "BiasAddSpec", "UnarySpec", "SiluMulSpec",
                "GeluMulSpec", "RmsNormSpec", "AddRmsNormSpec", "LayerNormSpec", "RopeSpec", "EmbeddingSpec",
                "QEmbeddingSpec", "ScalarSpec", "SliceSpec", "GatherSpec", "HadamardSpec", "RopeHadamardSpec")
CPU_FAMILIES = GPU_FAMILIES + ("QGemvI8Spec", "QGemvX16Spec", "RouterSpec", "MoeSpec")  # MoE: CPU only so far
# stored weights every target reads: dense (matmuls, norms, biases, tables) and packed b-bit codes. bfloat16 is
# read as its bit pattern and widened by a shift in the kernel (runtime/kernel_dtypes.py), so no target needs
# bf16 arithmetic and none converts it.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "int2", "int3", "int4", "int5", "int6", "int8")
_VNNI_FEATURES = ("avx512bw", "avx512vl", "avx512vnni")  # what int8 activations need (x86-64)
# aarch64: sdot/udot (FEAT_DotProd, Armv8.2+: Cortex-A55/A76 and later, Neoverse N1); i8mm adds usdot
_DOTPROD_FEATURES = ("neon", "dotprod")
_X86_ONLY_FAMILIES = ("QGemvX16Spec",)  # the interleaved-layout VNNI kernel has no aarch64 build


@dataclass(frozen=True)
class Target:
    """One place kernels run: `tvm` is the TVM target dict (never "native": see tvm-0.27-notes)."""

    name: str
    tvm: dict[str, Any] = field(hash=False)
    vector_bytes: int
    num_cores: int

    @property
    def mcpu(self) -> str:
        return str(self.tvm.get("mcpu", "generic"))

    @property
    def arch(self) -> str:
        """x86_64 | aarch64 | cuda: the machine architecture of the code."""
        if self.is_gpu:
            return "cuda"
        return str(self.tvm.get("mtriple", "")).split("-")[0]

    @property
    def is_gpu(self) -> bool:
        return self.tvm.get("kind") == "cuda"

    @property
    def is_host(self) -> bool:
        return self.name == "host"

    def tvm_target(self):
        import tvm  # heavy: TVM

        return tvm.target.Target(dict(self.tvm))

    def lanes(self, dtype_bytes: int = 4) -> int:
        """Values of `dtype_bytes` bytes in one SIMD register."""
        return max(1, self.vector_bytes // dtype_bytes)

    # ------------------------------------------------------------------ what it builds
    @property
    def families(self) -> tuple[str, ...]:
        """The kernel families (spec class names) this target builds."""
        if self.is_gpu:
            return GPU_FAMILIES
        return tuple(f for f in CPU_FAMILIES if f not in _X86_ONLY_FAMILIES) if self.arch == "aarch64" else CPU_FAMILIES

    @property
    def weight_dtypes(self) -> tuple[str, ...]:
        """The stored weight dtypes its kernels read (int<b>: packed b-bit codes)."""
        return WEIGHT_DTYPES

    @functools.cached_property
    def features(self) -> frozenset[str]:
        """LLVM's feature names for this CPU and its mattr (e.g. avx512vnni, dotprod, i8mm); empty for GPUs."""
        if self.is_gpu:
            return frozenset()
        from tvm.target import codegen  # heavy: TVM

        return frozenset(str(f) for f in codegen.llvm_get_cpu_features(self.tvm_target()))

    @property
    def supports_int8_activations(self) -> bool:
        """Whether matmuls may quantize their activations to int8 (QGemvI8Spec, QGemvX16Spec): x86-64 with
        AVX-512 BW/VL and VNNI, or aarch64 with the dot-product extension (sdot)."""
        needs = {"x86_64": _VNNI_FEATURES, "aarch64": _DOTPROD_FEATURES}.get(self.arch)
        return needs is not None and all(f in self.features for f in needs)

    @property
    def int8_requirement(self) -> str:
        """What int8 activations need on this target's architecture, in words."""
        return "the dot-product extension (+dotprod)" if self.arch == "aarch64" else "AVX-512 VNNI"

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation modes of its matmuls: float32, and int8 where supported."""
        return ("float32", "int8") if self.supports_int8_activations else ("float32",)

    def check(self, spec: Any) -> None:
        """Refuse (BitsmithError) a kernel spec this target does not build: its family, weight dtype or
        activation mode (a spec's `activations`, float32 unless it says int8)."""
        family = type(spec).__name__
        problems = []
        weights, activations = weight_dtype(spec), getattr(spec, "activations", "float32")
        if family not in self.families:
            problems.append(f"target {self.name} (it builds no {family})")
        elif weights is not None and weights not in self.weight_dtypes:
            problems.append(f"{weights} weights on target {self.name}")
        elif activations not in self.activations:
            lacks = f" ({self.mcpu}), which lacks {self.int8_requirement}" if activations == "int8" else ""
            problems.append(f"{activations} activations on target {self.name}{lacks}")
        if activations == "int8":
            fix = "use GemvSpec (float32 activations) on this target"
        else:
            fix = f"use a kernel family target {self.name} builds: {', '.join(self.families)}"
        refuse(problems, family, fix=fix)


def weight_dtype(spec: Any) -> str | None:
    """What a spec's weights are stored as: int<b> for packed b-bit codes, float32/float16/bfloat16 for dense ones
    (matmul weights, norm weights, biases, embedding tables); None for kernels without weights."""
    bits = getattr(spec, "bits", None)
    if bits is not None:
        return getattr(spec, "dense_dtype", DENSE_BITS.get(bits)) if bits in DENSE_BITS else f"int{bits}"
    for name in ("weight_dtype", "bias_dtype", "dtype"):
        if hasattr(spec, name):
            return getattr(spec, name)
    return None


def _vector_bytes(tvm_dict: dict[str, Any]) -> int:
    """Widest SIMD register of the target, from LLVM's view of its CPU features."""
    import tvm  # heavy: TVM
    from tvm.target import codegen  # heavy: TVM

    features = codegen.llvm_get_cpu_features(tvm.target.Target(dict(tvm_dict)))
    for feature, width in _VECTOR_FEATURES:
        if feature in features:
            return width
    return 16 if str(tvm_dict.get("mtriple", "")).startswith("aarch64") else 8


def _host_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def host_target() -> Target:
    """The machine we run on, with LLVM's exact CPU name (e.g. znver5): "native" silently means generic."""
    from tvm.target import codegen  # heavy: TVM

    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    cores = _host_cores()
    tvm_dict: dict[str, Any] = {"kind": "llvm", "mtriple": f"{arch}-linux-gnu",
                                "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores, **_FAST_MATH}
    return Target("host", tvm_dict, _vector_bytes(tvm_dict), cores)


def cross_target(name: str, num_cores: int = 4, cpu: str | None = None, mattr: tuple[str, ...] = ()) -> Target:
    """A target for another machine (built here, exported with a cross compiler). aarch64: `cpu` is LLVM's exact
    CPU name (cortex-a76: +dotprod, so int8-activation GEMVs with sdot; cortex-a72: NEON only), default generic
    (+neon, float activations only); `mattr` adds features (e.g. "+dotprod", "+i8mm") to that CPU's own."""
    if name != "aarch64-linux":
        raise _unknown(name)
    _check_cpu(cpu or "generic")
    attrs = list(dict.fromkeys(["+neon", *mattr]))
    bad = [a for a in attrs if not a.startswith(("+", "-"))]
    if bad:
        raise BitsmithError(f"target features {bad} need a sign", where="codegen target",
                            fix="write features as +dotprod, +i8mm (or -name to remove one)")
    tvm_dict: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": cpu or "generic",
                                "mattr": attrs, "num-cores": num_cores, **_FAST_MATH}
    return Target(name, tvm_dict, _vector_bytes(tvm_dict), num_cores)


def target_key(name: str, cpu: str | None = None, features: tuple[str, ...] = ()) -> str:
    """The name `resolve_target` reads for an aarch64 CPU: aarch64-linux:cortex-a76, aarch64-linux:generic+dotprod
    (features as LLVM spells them, with or without +). Other targets keep their name."""
    if name != "aarch64-linux" or (cpu is None and not features):
        return name
    return f"{name}:{cpu or 'generic'}" + "".join(f"+{f.lstrip('+')}" for f in features)


def _check_cpu(cpu: str) -> None:
    """LLVM silently treats an unknown CPU name as generic (no dotprod): refuse it instead."""
    import tvm  # heavy: TVM
    from tvm.target import codegen  # heavy: TVM

    known = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu"})
    names = [str(c) for c in codegen.llvm_get_cpu_archlist(known)]
    if cpu not in names:
        near = [n for n in names if n.startswith(cpu.split("-")[0])][:8]
        raise BitsmithError(f"unknown aarch64 CPU {cpu!r}", where="codegen target",
                            fix=f"use an LLVM CPU name, e.g. {', '.join(near or ['cortex-a76', 'cortex-a72'])}")


def cuda_target(arch: str = DEFAULT_CUDA_ARCH) -> Target:
    """An NVIDIA GPU of SM architecture `arch` (kernels built ahead of time with nvcc, see cuda_build.py).

    Limits are those every arch of CUDA_ARCHS has: 48 KiB of static shared memory per block, 1024
    threads per block, warps of 32.
    """
    if arch not in CUDA_ARCHS:
        raise _unknown(f"cuda_{arch}")
    tvm_dict: dict[str, Any] = {"kind": "cuda", "arch": arch, "max_shared_memory_per_block": 49152,
                                "max_threads_per_block": 1024, "thread_warp_size": 32}
    return Target(f"cuda_{arch}", tvm_dict, vector_bytes=16, num_cores=1)


def resolve_target(name: str | Target) -> Target:
    """A Target from its name ("host", "aarch64-linux", "cuda" (sm_90a) or "cuda_<arch>"); Targets pass through."""
    if isinstance(name, Target):
        return name
    if name == "host":
        return host_target()
    if name in SUPPORTED_TARGETS:
        return cross_target(name)
    if isinstance(name, str) and name.startswith("aarch64-linux:"):  # aarch64-linux:<cpu>[+feature...]
        cpu, *features = name.split(":", 1)[1].split("+")
        return cross_target("aarch64-linux", cpu=cpu or None, mattr=tuple(f"+{f}" for f in features if f))
    if name == "cuda":
        return cuda_target()
    if isinstance(name, str) and name.startswith("cuda_"):
        return cuda_target(name[len("cuda_"):])
    raise _unknown(name)


def _unknown(name: object) -> BitsmithError:
    cuda = ", ".join(f"cuda_{arch}" for arch in CUDA_ARCHS)
    return BitsmithError(f"unknown target {name!r}", where="codegen target",
                         fix=f"use one of {', '.join(SUPPORTED_TARGETS)}, cuda (= cuda_{DEFAULT_CUDA_ARCH}), {cuda}")
