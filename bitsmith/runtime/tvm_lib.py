"""Which TVM library a runtime process loads: libtvm_runtime.so alone, unless the process also compiles."""

from __future__ import annotations

import os
import sys


def runtime_library_only() -> bool:
    """Make the first `import tvm` load libtvm_runtime.so only, not the 240 MB libtvm_compiler.so (on a Cortex-A76
    under emulation 13 s / 157 MiB instead of 24 s / 350 MiB). Call it where a process only runs artifacts, before
    anything imports tvm; a process that compiles must not (tvm.te, tvm.compile need the compiler). Returns
    whether the setting can still take effect: TVM reads it once, at its first import."""
    if "tvm" in sys.modules:
        return os.environ.get("TVM_USE_RUNTIME_LIB") == "1"
    os.environ.setdefault("TVM_USE_RUNTIME_LIB", "1")
    return os.environ["TVM_USE_RUNTIME_LIB"] == "1"
