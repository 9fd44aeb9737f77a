"""GPU schedules of the TE-defined kernels (gpu/compute.py): dlight's default rules, and a hand schedule for the
fused residual add + rmsnorm (two outputs). The matmul and paged attention kernels schedule themselves
(gpu/matmul.py, gpu/paged_attention.py)."""

from __future__ import annotations

from typing import Any

import tvm
from tvm import te
from tvm.s_tir import Schedule
from tvm.s_tir import dlight as dl

from bitsmith.codegen.target import Target
from bitsmith.errors import BitsmithError


def te_func(tensors: list[Any], name: str) -> Any:
    """The unscheduled PrimFunc of a TE definition (arguments `tensors`, in order) with global_symbol `name`."""
    return te.create_prim_func(tensors).with_attr("global_symbol", name)


def dlight(func: Any, target: Target) -> Any:
    """dlight's default GPU rules: the norms as cross-thread reductions (one block per row), the
    elementwise, rope and embedding kernels as one thread per output element (Fallback)."""
    name = func.attrs["global_symbol"]
    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                    dl.gpu.Fallback())
    with target.tvm_target():
        scheduled = rules(tvm.IRModule({name: func}))[name]
    if not scheduled.attrs or not scheduled.attrs.get("tirx.is_scheduled", False):
        raise BitsmithError(f"no GPU schedule applies to {name}", where="codegen gpu",
                            fix="report the kernel description; it needs a hand schedule")
    return scheduled


def _row_threads(dim: int) -> int:
    """Threads of a per-row block: dim rounded up to whole warps, at most 256 (longer rows loop)."""
    return min(256, -(-dim // 32) * 32)


def schedule_add_rmsnorm(func: Any, dim: int) -> Any:
    """Two launches: `sum` one thread per element; the norm one block per row, its sum of squares a
    cross-thread reduction (each thread first sums its strided share of the row), then y."""
    threads = _row_threads(dim)
    sch = Schedule(func)
    for name in ("total", "den"):
        sch.compute_inline(sch.get_sblock(name))
    y = sch.get_sblock("y")
    row, col = sch.get_loops(y)
    sch.bind(row, "blockIdx.x")
    sch.bind(sch.split(col, [None, threads])[1], "threadIdx.x")
    ss = sch.get_sblock("ss")
    sch.set_scope(ss, 0, "shared")
    sch.compute_at(ss, row)
    _, k = sch.get_loops(ss)
    outer, inner = sch.split(k, [None, threads])
    sch.reorder(inner, outer)
    sch.bind(inner, "threadIdx.x")
    total = sch.get_sblock("sum")
    block, thread = sch.split(sch.fuse(*sch.get_loops(total)), [None, 256])
    sch.bind(block, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")
    return sch.mod["main"]
