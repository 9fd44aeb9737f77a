"""Kernel libraries for any target: the one entry, `build_kernel_library`. CPUs: one object file per kernel,
cached on disk by its key, linked into one .so. GPUs: every kernel in one nvcc run (gpu/cuda_build.py), the
whole library cached by its kernels' keys. One kernel cache (cache.py) serves both."""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import tvm
from tqdm import tqdm
from tvm.support import cc

from bitsmith.codegen.cache import kernel_cache_dir, kernel_key, temporary_next_to
from bitsmith.codegen.gpu.cuda_build import build_cuda
from bitsmith.codegen.target import Target, resolve_target
from bitsmith.errors import BitsmithError

LINKERS = {"aarch64-linux": "aarch64-linux-gnu-gcc"}  # target -> C compiler that links its .so
# target -> the Debian/Ubuntu packages its link needs: the cross gcc, and the target's C library (crti.o, libc.so),
# which `apt-get install --no-install-recommends gcc-aarch64-linux-gnu` leaves out.
CROSS_PACKAGES = {"aarch64-linux": ("gcc-aarch64-linux-gnu", "libc6-dev-arm64-cross")}
# What a linker says when a library or start file of the target's C library is not installed.
MISSING_LIBC = ("cannot find crt", "cannot find -lc", "cannot find -lgcc", "cannot find libc.so")


@dataclass(frozen=True)
class BuildReport:
    library: Path
    kernels: int
    built: int  # compiled now
    cached: int  # taken from the kernel cache
    seconds: float

    def summary(self) -> str:
        return (f"kernels: {self.kernels} ({self.built} built, {self.cached} from cache) in {self.seconds:.1f} s "
                f"-> {self.library.name}")


def build_kernel_library(specs: Iterable[Any], target: Target | str, out: str | Path,
                         cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> BuildReport:
    """Compile what the kernel cache lacks, then write every kernel of `specs` into the shared library `out`
    for `target` (a CPU: linked objects; a GPU: launchers and one fatbin of its SM code, built with nvcc,
    loadable by a runtime-only TVM on a machine with a driver; no GPU is needed here). Every spec must be
    one the target builds (Target.check)."""
    tgt = resolve_target(target)
    cache = Path(cache_dir) if cache_dir else kernel_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    unique = {spec.name: spec for spec in specs}
    for spec in unique.values():
        tgt.check(spec)
    t0 = time.perf_counter()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    built = build_cuda(unique, tgt, out, cache) if tgt.is_gpu else _build_cpu(unique, tgt, out, cache)
    report = BuildReport(out, len(unique), built, len(unique) - built, time.perf_counter() - t0)
    if log:
        log(report.summary())
    return report


def _build_cpu(specs: dict[str, Any], target: Target, out: Path, cache: Path) -> int:
    """One cached object file per kernel, linked into `out`; returns how many were compiled now."""
    objects, built = [], 0
    for name, spec in tqdm(sorted(specs.items()), desc=f"kernels ({target.name})", unit="kernel", leave=False,
                           disable=len(specs) < 8):
        path = cache / f"{name[:80]}-{kernel_key(spec, target)}.o"
        if not path.is_file():
            _compile_object(spec, target, path)
            built += 1
        objects.append(str(path))
    linker = _linker(target)
    try:
        cc.create_shared(str(out), objects, cc=linker) if linker else cc.create_shared(str(out), objects)
    except RuntimeError as exc:
        raise link_error(str(exc), target, len(objects), out, cache) from exc
    return built


def link_error(output: str, target: Target, count: int, out: Path, cache: Path) -> BitsmithError:
    """The linker's own complaint (not TVM's last line, the command line), and the fix it points to."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    said = [line for line in lines if "cannot find" in line or "undefined" in line] or \
        [line for line in lines if "error" in line and not line.startswith(("Compilation error", "Command line"))]
    problem = f"linking {count} kernels failed: {'; '.join(said[:3]) or (lines[-1] if lines else 'no output')}"
    where = f"codegen build {out.name} (linker {LINKERS.get(target.name, 'cc')})"
    if target.name in CROSS_PACKAGES and any(m in output for m in MISSING_LIBC):
        packages = " ".join(CROSS_PACKAGES[target.name])
        return BitsmithError(problem, where=where,
                             fix=f"the {target.name} C library is not installed: apt-get install {packages} "
                                 f"(gcc-aarch64-linux-gnu without recommends lacks libc6-dev-arm64-cross)")
    if any(m in output for m in MISSING_LIBC):
        return BitsmithError(problem, where=where, fix="install the C library development files (libc6-dev)")
    return BitsmithError(problem, where=where,
                         fix=f"if an object file is damaged, clear the kernel cache {cache} and rebuild")


def _compile_object(spec: Any, target: Target, path: Path) -> None:
    """Compile one kernel to an object file, written atomically (concurrent builds never see half a file)."""
    module = tvm.compile(tvm.IRModule({spec.name: spec.prim_func(target)}), target=target.tvm_target())
    with temporary_next_to(path) as tmp:
        module.mod.write_to_file(str(tmp))
        os.replace(tmp, path)


def _linker(target: Target) -> str | None:
    cc = LINKERS.get(target.name)
    if cc is not None and shutil.which(cc) is None:
        raise BitsmithError(f"the {target.name} linker {cc} is not installed", where="codegen build",
                            fix=f"apt-get install {' '.join(CROSS_PACKAGES.get(target.name, ()))} (Debian/Ubuntu)")
    return cc
