"""Kernel schedules: one entry point as an ordered list of kernel calls over a liveness-planned arena."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# A schedule is what the executor runs for one step of one entry point at a fixed row count:
#
#   arena (activations, one byte buffer)   weights (by name)   KV cache [layers, 2, ctx, kv, hd]
#   +-------+-----------+----+------+       embed_tokens ...     cache[l] = one layer's slice
#   | buf a | buf b     |    | buf c|
#   +-------+-----------+----+------+       constants (rope tables), inside the manifest
#   buffers whose lifetimes do not overlap share bytes (offsets from the liveness plan)
#
# Each call names a kernel symbol in kernels/<target>.so and its arguments, inputs first and
# outputs last: ("buffer", name, shape) | ("weight", name) | ("cache", layer) | ("kv_scales", layer)
# | ("const", name). ("cache", l) is layer l's block pool, ("kv_scales", l) its int8/int4 scales.
# A buffer is a typed region (offset, shape, dtype) of the arena; a call sees it with its own
# shape (same bytes: a norm sees [rows, dim] what SwiGLU sees as [rows * dim]).

ARG_KINDS = ("buffer", "weight", "cache", "kv_scales", "const")


@dataclass(frozen=True)
class BufferSlot:
    offset: int
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        size = 1
        for d in self.shape:
            size *= d
        return size * {"float32": 4, "int64": 8, "float16": 2, "int32": 4, "uint32": 4}[self.dtype]


@dataclass(frozen=True)
class KernelCall:
    kernel: str
    args: tuple[tuple[str, Any], ...]
    value: str = ""  # the IR value it computes (for errors and debugging)


@dataclass(frozen=True)
class Schedule:
    entry: str
    rows: int  # tokens per call (padded rows: position -1); rows of one call may be different sequences'
    ctx: int  # longest sequence the kernels were built for
    arena_bytes: int
    buffers: dict[str, BufferSlot]
    inputs: dict[str, str]  # "tokens" / "positions" / "block_tables" -> buffer
    output: str  # the logits buffer [rows, vocab]
    calls: tuple[KernelCall, ...]
    # calls[head_from:] (the lm_head) map `hidden` [rows, dim] row by row to the logits, so they can run
    # for just the rows that are sampled; hidden "" means no such split (head_from = len(calls))
    hidden: str = ""
    head_from: int = -1

    def __post_init__(self) -> None:
        if self.head_from < 0:
            object.__setattr__(self, "head_from", len(self.calls))

    def to_json(self) -> dict[str, Any]:
        return {"entry": self.entry, "rows": self.rows, "ctx": self.ctx, "arena_bytes": self.arena_bytes,
                "buffers": {k: [b.offset, list(b.shape), b.dtype] for k, b in self.buffers.items()},
                "inputs": dict(self.inputs), "output": self.output, "hidden": self.hidden,
                "head_from": self.head_from,
                "calls": [[c.kernel, [[a[0], a[1], *([list(a[2])] if len(a) > 2 else [])] for a in c.args], c.value]
                          for c in self.calls]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Schedule":
        return cls(entry=data["entry"], rows=int(data["rows"]), ctx=int(data["ctx"]),
                   arena_bytes=int(data["arena_bytes"]),
                   buffers={k: BufferSlot(int(o), tuple(s), d) for k, (o, s, d) in data["buffers"].items()},
                   inputs=dict(data["inputs"]), output=data["output"], hidden=data.get("hidden", ""),
                   head_from=int(data.get("head_from", -1)),
                   calls=tuple(KernelCall(k, tuple(_arg(a) for a in args), v) for k, args, v in data["calls"]))


def _arg(data: list[Any]) -> tuple[Any, ...]:
    return (data[0], data[1], tuple(data[2])) if data[0] == "buffer" else (data[0], data[1])


@dataclass(frozen=True)
class KernelPlan:
    """The manifest's `kernels` entry: the library per target, the schedules and the constants."""

    target: str  # "host" | "aarch64-linux" | "cuda_<sm>"
    library: str  # path inside the artifact, e.g. kernels/host.so
    arch: str  # machine architecture of the library: x86_64 | aarch64 | cuda
    target_cpu: str  # the exact chip the library was built for (LLVM mcpu, or the SM architecture)
    schedules: dict[str, Schedule]
    constants: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "values"}
    kv: dict[str, Any]  # the KV plan (passes/kv_plan.py KVPlan.to_json): block pools the kernels read

    @property
    def device(self) -> str:
        """The device kind that runs the library (the key of runtime/runners.py's RUNNERS): cpu | cuda."""
        return "cuda" if self.arch == "cuda" else "cpu"

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "library": self.library, "arch": self.arch,
                "target_cpu": self.target_cpu,
                "schedules": {k: s.to_json() for k, s in self.schedules.items()},
                "constants": self.constants, "kv": self.kv}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "KernelPlan":
        return cls(target=data["target"], library=data["library"], arch=data["arch"],
                   target_cpu=data["target_cpu"],
                   schedules={k: Schedule.from_json(s) for k, s in data["schedules"].items()},
                   constants=data["constants"], kv=data["kv"])
