"""The kernel cache: built kernels on disk, keyed by everything that determines their machine code."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import tvm

from bitsmith.codegen.kernel import describe
from bitsmith.codegen.target import Target

CODEGEN_VERSION = 4  # bump when a kernel's calling convention changes, CPU or GPU (source edits are keyed below)


def kernel_cache_dir() -> Path:
    """$BITSMITH_KERNEL_CACHE, else ~/.cache/bitsmith/kernels."""
    env = os.environ.get("BITSMITH_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "bitsmith" / "kernels"


def kernel_key(spec: Any, target: Target) -> str:
    """sha256 of what determines the machine code: the spec, the target dict, TVM and codegen versions."""
    identity = {"spec": describe(spec), "target": target.tvm, "tvm": tvm.__version__, "codegen": CODEGEN_VERSION,
                "source": codegen_source_hash()}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def codegen_source_hash() -> str:
    """sha256 of every kernel generator's source (this package, gpu/ included, and the weight layouts it
    reads): any edit to a kernel invalidates its cached machine code, without relying on a version bump (a
    forgotten bump once served kernels with a fixed bug from the cache)."""
    root = Path(__file__).resolve().parent
    layouts = [root.parent / "runtime" / "packed_layout.py",
               root.parent / "runtime" / "interleave.py"]
    files = sorted(root.rglob("*.py")) + layouts
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.relative_to(root.parent).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def temporary_next_to(path: Path) -> Iterator[Path]:
    """A temporary file next to `path` (same file system, so os.replace onto `path` is atomic: concurrent
    builds never see half a file), removed unless it was replaced."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=path.suffix or ".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
