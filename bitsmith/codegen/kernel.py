"""The protocol every kernel family implements, plus a build-and-call helper for tests and benches."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol, runtime_checkable

import numpy as np
import tvm

from bitsmith.codegen.target import Target, resolve_target
from bitsmith.runtime.kernel_dtypes import kernel_array

# Conventions shared by all families (the lowering pass and the executor rely on them):
# - a spec is a frozen dataclass; every field is a plain int/float/str/bool/None, so the spec's
#   JSON form (`describe`) is its identity for the kernel cache;
# - `name` is a unique C symbol built from every field (two specs with the same name are equal);
# - `prim_func(target)` returns a TIR PrimFunc scheduled for `target` (its CPU schedule, or on a GPU target
#   its GPU one) whose global_symbol is `name`; the target says which families it builds (Target.check).
#   Families with a GPU kernel also have `gpu_definition()`, its unscheduled PrimFunc (target-independent:
#   built for a CPU it checks the GPU kernel's semantics);
# - arguments are contiguous row-major buffers, inputs first, outputs last (destination passing);
#   activations are float32; weights keep their stored dtype (float32/float16/packed uint32).


@runtime_checkable
class KernelSpec(Protocol):
    @property
    def name(self) -> str: ...

    def prim_func(self, target: Target) -> Any: ...


def describe(spec: Any) -> dict[str, Any]:
    """The spec as JSON-able data: its family and fields (the kernel cache key's core)."""
    return {"family": type(spec).__name__, **dataclasses.asdict(spec)}


def c_float(value: float) -> str:
    """A float as a C-symbol-safe token for kernel names (1e-06 -> 1em06, 0.125 -> 0p125)."""
    return repr(float(value)).replace(".", "p").replace("-", "m").replace("+", "")


def build_module(specs: list[Any], target: Target | str = "host") -> Any:
    """One TVM module holding every distinct spec's kernel for a CPU target (one LLVM invocation); tests and
    benches call it (artifacts use build.build_kernel_library)."""
    tgt = resolve_target(target)
    for spec in specs:
        tgt.check(spec)
    funcs = {spec.name: spec.prim_func(tgt) for spec in dict.fromkeys(specs)}
    return tvm.compile(tvm.IRModule(funcs), target=tgt.tvm_target())


@functools.lru_cache(maxsize=None)
def _host_module(spec: Any) -> Any:
    return build_module([spec], "host")


def call_kernel(spec: Any, inputs: list[np.ndarray], outputs: list[np.ndarray], module: Any = None) -> list[np.ndarray]:
    """Run `spec`'s host kernel from `module` (built by `build_module`; default: build `spec` alone for the
    host, once per process); outputs are filled and returned.

    Arrays must already have the kernel's dtypes and shapes (a bfloat16 weight as an ml_dtypes array: it is
    passed as its uint16 bits, see runtime/kernel_dtypes.py); they are copied into 64-byte aligned TVM
    tensors, and outputs (and inputs the kernel updates in place) are copied back.
    """
    dev = tvm.cpu(0)
    func = (module if module is not None else _host_module(spec))[spec.name]
    arrays = [np.ascontiguousarray(a) for a in (*inputs, *outputs)]
    tensors = [tvm.runtime.tensor(kernel_array(a), dev) for a in arrays]
    func(*tensors)
    for a, t, original in zip(arrays, tensors, (*inputs, *outputs)):
        if original.flags.writeable:  # back in the array's own dtype (a bf16 array's uint16 bits, reinterpreted)
            original[...] = t.numpy().view(a.dtype).reshape(original.shape)
    return list(outputs)
