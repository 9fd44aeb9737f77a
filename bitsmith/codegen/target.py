"""Compilation targets: the host CPU by its exact LLVM name, an aarch64 cross target, or an NVIDIA GPU (CUDA)."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from typing import Any

from bitsmith.errors import BitsmithError

SUPPORTED_TARGETS = ("host", "aarch64-linux")
# SM architectures nvcc builds CUDA kernels for ("a": the arch-specific features of that exact chip)
CUDA_ARCHS = ("sm_80", "sm_86", "sm_89", "sm_90", "sm_90a")
DEFAULT_CUDA_ARCH = "sm_90a"

# widest SIMD register each feature implies, in bytes (checked widest first)
_VECTOR_FEATURES = (("avx512f", 64), ("avx2", 32), ("avx", 32), ("sve", 16), ("neon", 16), ("sse2", 16))
# nsz lets LLVM drop `0.0 + x` (a reduction's first step becomes an FMA); reassoc lets it turn the
# per-row horizontal sums into shuffle trees (576-column int4 GEMV: 11.4 -> 9.7 us). Summation order
# changes within fp32 rounding; no nnan/ninf/arcp.
_FAST_MATH = {"fast-math-nsz": True, "fast-math-reassoc": True}


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
        import tvm

        return tvm.target.Target(dict(self.tvm))

    def lanes(self, dtype_bytes: int = 4) -> int:
        """Values of `dtype_bytes` bytes in one SIMD register."""
        return max(1, self.vector_bytes // dtype_bytes)


def _vector_bytes(tvm_dict: dict[str, Any]) -> int:
    """Widest SIMD register of the target, from LLVM's view of its CPU features."""
    import tvm
    from tvm.target import codegen

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
    from tvm.target import codegen

    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    cores = _host_cores()
    tvm_dict: dict[str, Any] = {"kind": "llvm", "mtriple": f"{arch}-linux-gnu",
                                "mcpu": codegen.llvm_get_system_cpu(), "num-cores": cores, **_FAST_MATH}
    return Target("host", tvm_dict, _vector_bytes(tvm_dict), cores)


def cross_target(name: str, num_cores: int = 4) -> Target:
    """A target for another machine (built here, exported with a cross compiler)."""
    if name != "aarch64-linux":
        raise _unknown(name)
    tvm_dict: dict[str, Any] = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "generic",
                                "mattr": ["+neon"], "num-cores": num_cores, **_FAST_MATH}
    return Target(name, tvm_dict, _vector_bytes(tvm_dict), num_cores)


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
    if name == "cuda":
        return cuda_target()
    if isinstance(name, str) and name.startswith("cuda_"):
        return cuda_target(name[len("cuda_"):])
    raise _unknown(name)


def _unknown(name: object) -> BitsmithError:
    cuda = ", ".join(f"cuda_{arch}" for arch in CUDA_ARCHS)
    return BitsmithError(f"unknown target {name!r}", where="codegen target",
                         fix=f"use one of {', '.join(SUPPORTED_TARGETS)}, cuda (= cuda_{DEFAULT_CUDA_ARCH}), {cuda}")
