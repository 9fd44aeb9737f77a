"""Device profiles as data (RAM, bandwidth, cores, ISA features), user profiles from JSON/TOML, and this host measured live."""

from __future__ import annotations

import json
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.passes.kv_plan import parse_bytes
from bitsmith.runtime.memory import RUNTIME_BASE_BYTES

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceProfile:
    """What a fit check and a speed prediction need of a device. Bandwidth is the sustained streaming read the
    predictions use (decode is bound by it); `peak_bandwidth_gbs` is the bus's nominal figure, for reference."""

    name: str
    description: str
    ram_bytes: int  # physical memory
    reserved_bytes: int  # what the OS, firmware and GPU carve-outs keep (RAM - this = usable by the server)
    bandwidth_gbs: float  # sustained read, GB/s (1e9): what decode tok/s predictions divide by
    cores: int
    arch: str  # "aarch64" | "x86_64"
    features: tuple[str, ...] = ()  # ISA features the kernels may use: "neon", "dotprod", "i8mm" / "avx512_vnni"...
    llvm_cpu: str | None = None  # LLVM's -mcpu for this core (None: the host's own, found at compile time)
    gflops: float = 0.0  # fp32 peak (cores x clock x FMA lanes x 2): the prefill ceiling
    peak_bandwidth_gbs: float = 0.0  # nominal bus bandwidth (0: unknown)
    source: str = ""  # where the numbers come from, and which are estimates

    @property
    def usable_bytes(self) -> int:
        return self.ram_bytes - self.reserved_bytes

    @property
    def model_budget(self) -> int:
        """Bytes for weights + KV cache + workspace: usable memory less the runtime's own (RUNTIME_BASE_BYTES)."""
        return self.usable_bytes - RUNTIME_BASE_BYTES

    @property
    def compile_target(self) -> str:
        """The `--target` whose kernels run here: host, or aarch64-linux:<llvm cpu> (the core's own features)."""
        if self.arch == "aarch64":
            return f"aarch64-linux:{self.llvm_cpu}" if self.llvm_cpu else "aarch64-linux"
        return "host"

    def summary(self) -> str:
        return (f"{self.name}: {self.description}; {self.ram_bytes / GiB:.1f} GiB RAM ({self.usable_bytes / GiB:.1f} "
                f"usable), {self.bandwidth_gbs:g} GB/s read, {self.cores} cores {self.arch}"
                + (f" {self.llvm_cpu}" if self.llvm_cpu else "") + (f" [{', '.join(self.features)}]" if self.features else ""))

    def to_json(self) -> dict[str, Any]:
        return {**{k: getattr(self, k) for k in self.__dataclass_fields__}, "features": list(self.features),
                "usable_bytes": self.usable_bytes, "model_budget": self.model_budget}


# FP32 peak = cores x GHz x 16 (two 128-bit NEON FMA pipes: 2 pipes x 4 lanes x 2 flops) for the Arm cores below.
# Sustained read figures are estimates where marked: no board was measured here (issue 17 has no ARM machine).
PROFILES: dict[str, DeviceProfile] = {p.name: p for p in (
    DeviceProfile(
        "raspberry-pi-5", "Raspberry Pi 5 8 GB (BCM2712, 4x Cortex-A76 2.4 GHz)",
        ram_bytes=8 * GiB, reserved_bytes=GiB // 2, bandwidth_gbs=10.0, cores=4, arch="aarch64",
        features=("neon", "fp16", "dotprod"), llvm_cpu="cortex-a76", gflops=4 * 2.4 * 16, peak_bandwidth_gbs=17.1,
        # product brief: LPDDR4X-4267 on a 32-bit bus = 17.1 GB/s nominal. Cortex-A76 is Armv8.2 with dotprod, no i8mm.
        source="Raspberry Pi 5 product brief (LPDDR4X-4267, 32-bit: 17.1 GB/s nominal); sustained read 10 GB/s is an "
               "estimate (~60% of nominal); 0.5 GiB reserved for firmware/GPU CMA and Raspberry Pi OS Lite is an estimate"),
    DeviceProfile(
        "raspberry-pi-4", "Raspberry Pi 4 Model B 4 GB (BCM2711, 4x Cortex-A72 1.8 GHz)",
        ram_bytes=4 * GiB, reserved_bytes=GiB // 2, bandwidth_gbs=4.5, cores=4, arch="aarch64",
        features=("neon",), llvm_cpu="cortex-a72", gflops=4 * 1.8 * 16, peak_bandwidth_gbs=12.8,
        # product brief: LPDDR4-3200 on a 32-bit bus = 12.8 GB/s nominal; 1.8 GHz on boards from 2021 (1.5 GHz before).
        # Cortex-A72 is Armv8.0: NEON only, no dotprod (int8-activation GEMVs cannot use sdot).
        source="Raspberry Pi 4 product brief (LPDDR4-3200, 32-bit: 12.8 GB/s nominal); sustained read 4.5 GB/s is an "
               "estimate (published STREAM-style runs report 4-5 GB/s); 0.5 GiB reserved is an estimate"),
    DeviceProfile(
        "jetson-orin-nano-8gb", "NVIDIA Jetson Orin Nano 8 GB, CPU only (6x Cortex-A78AE 1.5 GHz)",
        ram_bytes=8 * GiB, reserved_bytes=3 * GiB // 2, bandwidth_gbs=30.0, cores=6, arch="aarch64",
        features=("neon", "fp16", "dotprod"), llvm_cpu="cortex-a78ae", gflops=6 * 1.5 * 16, peak_bandwidth_gbs=68.0,
        # NVIDIA Jetson Orin Nano datasheet: 128-bit LPDDR5, 68 GB/s (shared with the GPU; 102 GB/s in the JetPack 6.1
        # "Super" mode, 1.7 GHz CPU). Cortex-A78AE: Armv8.2 with dotprod, no i8mm.
        source="NVIDIA Jetson Orin Nano datasheet (128-bit LPDDR5, 68 GB/s shared with the GPU); the CPU cluster's "
               "sustained read of 30 GB/s and 1.5 GiB reserved for JetPack (Ubuntu) are estimates"),
    DeviceProfile(
        "aarch64-server", "a generic 64-bit ARM server slice: 16 Neoverse N1 cores 2.5 GHz, 32 GiB "
                          "(AWS Graviton2 c6g.4xlarge / Ampere Altra class)",
        ram_bytes=32 * GiB, reserved_bytes=GiB, bandwidth_gbs=50.0, cores=16, arch="aarch64",
        features=("neon", "fp16", "dotprod"), llvm_cpu="neoverse-n1", gflops=16 * 2.5 * 16, peak_bandwidth_gbs=204.8,
        # Graviton2: 8 channels of DDR4-3200 per 64-core socket = 204.8 GB/s; a 16-core slice gets a share of it.
        source="AWS Graviton2 / Neoverse N1 (8x DDR4-3200 per socket: 204.8 GB/s); 50 GB/s for a 16-core slice and "
               "1 GiB reserved are estimates"),
)}

HOST = "host"
AARCH64_KERNEL_FEATURES = ("dotprod", "i8mm")  # what selects aarch64 kernels (sdot, usdot): codegen/gemv_int8_neon.py


def device_names() -> tuple[str, ...]:
    return (*PROFILES, HOST)


def device_profile(name_or_path: str | Path) -> DeviceProfile:
    """A built-in profile by name, `host` (this machine, measured now), or a user profile from a .json/.toml file."""
    text = str(name_or_path)
    if text in PROFILES:
        return PROFILES[text]
    if text == HOST:
        return host_profile()
    path = Path(text)
    if path.suffix.lower() in (".json", ".toml"):
        return load_profile_file(path)
    raise BitsmithError(f"unknown device {text!r}", where="--device",
                        fix=f"use one of {', '.join(device_names())}, or a .json/.toml profile file")


# user profile file keys: name, description, ram ("8GB", "7.5GiB" or bytes), reserved (default 0.5GiB),
# bandwidth_gbs, cores, arch (default aarch64), features, llvm_cpu, gflops, peak_bandwidth_gbs, source
_REQUIRED = ("ram", "bandwidth_gbs", "cores")


def load_profile_file(path: Path) -> DeviceProfile:
    """A DeviceProfile from a small JSON or TOML file (a [device] table or top-level keys)."""
    if not path.is_file():
        raise BitsmithError(f"device profile {str(path)!r} does not exist", where="--device", fix="check the path")
    try:
        if path.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:  # tomllib.TOMLDecodeError and JSONDecodeError are ValueErrors
        raise BitsmithError(f"cannot read the device profile: {exc}", where=str(path),
                            fix="write JSON or TOML with ram, bandwidth_gbs and cores") from exc
    data = data.get("device", data)
    missing = [k for k in _REQUIRED if k not in data]
    if missing:
        raise BitsmithError(f"the device profile lacks {', '.join(missing)}", where=str(path),
                            fix='add e.g. ram = "8GB", bandwidth_gbs = 10, cores = 4')
    known = {"name", "description", "reserved", "arch", "features", "llvm_cpu", "gflops", "peak_bandwidth_gbs",
             "source", *_REQUIRED}
    unknown = sorted(set(data) - known)
    if unknown:
        raise BitsmithError(f"unknown device profile keys {unknown}", where=str(path), fix=f"use only {sorted(known)}")
    arch = data.get("arch", "aarch64")
    if arch not in ("aarch64", "x86_64"):
        raise BitsmithError(f"arch {arch!r} is not supported", where=str(path), fix="use aarch64 or x86_64")
    return DeviceProfile(
        name=str(data.get("name", path.stem)), description=str(data.get("description", f"user profile {path}")),
        ram_bytes=_size(data["ram"], path), reserved_bytes=_size(data.get("reserved", "0.5GiB"), path),
        bandwidth_gbs=float(data["bandwidth_gbs"]), cores=int(data["cores"]), arch=arch,
        features=tuple(str(f) for f in data.get("features", ())), llvm_cpu=data.get("llvm_cpu"),
        gflops=float(data.get("gflops", 0.0)), peak_bandwidth_gbs=float(data.get("peak_bandwidth_gbs", 0.0)),
        source=str(data.get("source", f"user profile {path}")))


def _size(value: Any, path: Path) -> int:
    try:
        return parse_bytes(value) if isinstance(value, (int, str)) else int(value)
    except BitsmithError as exc:
        raise BitsmithError(exc.problem, where=str(path), fix=exc.fix) from exc


# ---------------------------------------------------------------------------------------------------------------
# this host, measured live


# features with int8 dot products (4 int8 multiply-adds per 32-bit lane): int8-activation GEMMs run ~4x fp32
INT8_DOT_FEATURES = ("dotprod", "avx512_vnni", "avx_vnni")
# x86 flags (from /proc/cpuinfo) and aarch64 hwcaps that decide which kernels run
_X86_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                 "amx_tile", "amx_int8")
_ARM_FEATURES = {"asimd": "neon", "fphp": "fp16", "asimddp": "dotprod", "i8mm": "i8mm", "sve": "sve"}


def _cpuinfo() -> tuple[str, set[str]]:
    """(model name, flags or hwcaps) of the first processor in /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model, flags = None, None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model") and model is None:
            model = value.strip()
        elif key in ("flags", "Features") and flags is None:
            flags = set(value.split())
    return model or platform.processor() or "unknown", flags or set()


def _meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("MemTotal", "MemAvailable"):
            values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])


def read_bandwidth_gbs(nbytes: int = 256 << 20, rounds: int = 5) -> float:
    """Best streaming read of a `nbytes` buffer over as many threads as this process may use (numpy reductions
    release the GIL; on this host it gives what bench/read_probe.c's vector loads give, 16.5 vs 16.4 GB/s)."""
    threads = len(os.sched_getaffinity(0))
    data = np.ones(nbytes // 8, dtype=np.int64)  # written, so every page is resident before timing
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(rounds):
            start = time.perf_counter()
            list(pool.map(np.bitwise_or.reduce, parts))
            best = max(best, data.nbytes / (time.perf_counter() - start) / 1e9)
    return best


def matmul_gflops(n: int = 2048, rounds: int = 3) -> float:
    """Best fp32 GEMM rate of numpy's BLAS here (a ceiling for prefill, as the Arm profiles' peak figures are)."""
    a = np.ones((n, n), dtype=np.float32)
    best = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        a @ a
        best = max(best, 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


def host_profile() -> DeviceProfile:
    """This machine: RAM and available memory from /proc/meminfo, features from /proc/cpuinfo, read bandwidth and
    GEMM rate measured now (about a second)."""
    model, flags = _cpuinfo()
    total, available = _meminfo()
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    if arch == "aarch64":
        features = tuple(dict.fromkeys(v for k, v in _ARM_FEATURES.items() if k in flags))
    else:
        features = tuple(f for f in _X86_FEATURES if f in flags)
    bandwidth, gflops = read_bandwidth_gbs(), matmul_gflops()
    return DeviceProfile(
        HOST, f"this machine ({model})", ram_bytes=total, reserved_bytes=total - available,
        bandwidth_gbs=round(bandwidth, 1), cores=len(os.sched_getaffinity(0)), arch=arch, features=features,
        llvm_cpu=None, gflops=round(gflops, 1),
        source="measured now: /proc/meminfo (usable = MemAvailable), /proc/cpuinfo, a threaded numpy streaming read "
               "of 256 MiB (best of 5), numpy fp32 GEMM 2048^3 (best of 3)")


def budget_label(profile: DeviceProfile) -> str:
    """How a device's model budget comes about, for the KV plan's refusal."""
    return (f"{profile.name} ({profile.ram_bytes / GiB:.1f} GiB RAM, {profile.usable_bytes / GiB:.1f} usable, less "
            f"{RUNTIME_BASE_BYTES >> 20} MiB for the runtime)")


def for_device(options: Any, profile: DeviceProfile) -> Any:
    """CompileOptions planned for `profile`: the KV plan's budget is the device's model budget (or --memory when
    smaller), and an aarch64 device gets aarch64 kernels for its core (`--target host` cannot run there)."""
    budget = profile.model_budget
    if options.memory.budget is not None:
        budget = min(budget, parse_bytes(options.memory.budget))
    memory = replace(options.memory, budget=str(budget), device=budget_label(profile))
    target = options.target
    if profile.arch == "aarch64" and target.name in ("host", "aarch64-linux"):
        # the features the aarch64 kernels use go along too: a user profile may have them without an LLVM cpu
        # that implies them (generic + dotprod), and a newer core may add i8mm
        used = tuple(f for f in profile.features if f in AARCH64_KERNEL_FEATURES)
        target = replace(target, name="aarch64-linux", cpu=target.cpu or profile.llvm_cpu,
                         features=target.features or used)
    elif profile.arch == "aarch64" and target.name != "none":
        raise BitsmithError(f"--target {target.name} does not run on {profile.name} ({profile.arch})",
                            where="--device", fix="drop --target (the device picks aarch64-linux) or use --target none")
    elif profile.arch != platform.machine().lower().replace("amd64", "x86_64") and target.name == "host":
        raise BitsmithError(f"{profile.name} is {profile.arch}; this machine's kernels do not run there",
                            where="--device", fix="compile on that kind of machine, or use --target none")
    return replace(options, memory=memory, target=target)
