"""Kernel libraries: one object file per kernel, cached on disk by its description, linked into one .so."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from tqdm import tqdm

from bitsmith.codegen.kernel import describe
from bitsmith.codegen.target import Target, resolve_target
from bitsmith.errors import BitsmithError

CODEGEN_VERSION = 4  # bump when a kernel's calling convention changes (source edits are keyed below)
LINKERS = {"aarch64-linux": "aarch64-linux-gnu-gcc"}  # target -> C compiler that links its .so


def kernel_cache_dir() -> Path:
    """$BITSMITH_KERNEL_CACHE, else ~/.cache/bitsmith/kernels."""
    env = os.environ.get("BITSMITH_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bitsmith" / "kernels"


def kernel_key(spec: Any, target: Target) -> str:
    """sha256 of what determines the machine code: the spec, the target dict, TVM and codegen versions."""
    import tvm

    identity = {"spec": describe(spec), "target": target.tvm, "tvm": tvm.__version__, "codegen": CODEGEN_VERSION,
                "source": codegen_source_hash()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def codegen_source_hash() -> str:
    """sha256 of every kernel generator's source (this package and the weight layouts it reads): any edit
    to a kernel invalidates its cached machine code, without relying on a version bump (a forgotten bump
    once served kernels with a fixed bug from the cache)."""
    root = Path(__file__).resolve().parent
    layouts = [root.parent / "runtime" / "packed_layout.py",
               root.parent / "runtime" / "interleave.py"]
    files = sorted(root.rglob("*.py")) + layouts
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root.parent).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


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


def _compile_object(spec: Any, target: Target, path: Path) -> None:
    """Compile one kernel to an object file, written atomically (concurrent builds never see half a file)."""
    import tvm

    module = tvm.compile(tvm.IRModule({spec.name: spec.prim_func(target)}), target=target.tvm_target())
    fd, tmp = tempfile.mkstemp(suffix=".o", dir=path.parent)
    os.close(fd)
    try:
        module.mod.write_to_file(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _linker(target: Target) -> str | None:
    cc = LINKERS.get(target.name)
    if cc is not None and shutil.which(cc) is None:
        raise BitsmithError(f"the {target.name} linker {cc} is not installed", where="codegen build",
                            fix="apt-get install gcc-aarch64-linux-gnu (Debian/Ubuntu)")
    return cc


def build_kernel_library(specs: Iterable[Any], target: Target | str, out: str | Path,
                         cache_dir: str | Path | None = None, log: Callable[[str], None] | None = None) -> BuildReport:
    """Compile what the cache lacks, then link every kernel of `specs` into the shared library `out`."""
    from tvm.support import cc

    tgt = resolve_target(target)
    cache = Path(cache_dir) if cache_dir else kernel_cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    unique = {spec.name: spec for spec in specs}
    t0 = time.perf_counter()
    objects, built = [], 0
    for name, spec in tqdm(sorted(unique.items()), desc=f"kernels ({tgt.name})", unit="kernel", leave=False,
                           disable=len(unique) < 8):
        path = cache / f"{name[:80]}-{kernel_key(spec, tgt)}.o"
        if not path.is_file():
            _compile_object(spec, tgt, path)
            built += 1
        objects.append(str(path))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    linker = _linker(tgt)
    try:
        cc.create_shared(str(out), objects, cc=linker) if linker else cc.create_shared(str(out), objects)
    except RuntimeError as exc:
        raise BitsmithError(f"linking {len(objects)} kernels failed: {str(exc).strip().splitlines()[-1]}",
                            where=f"codegen build {out.name}", fix=f"clear the kernel cache {cache} and rebuild") from exc
    report = BuildReport(out, len(unique), built, len(unique) - built, time.perf_counter() - t0)
    if log:
        log(report.summary())
    return report
