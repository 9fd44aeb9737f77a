"""GPU schedule of the online Hadamard kernels (codegen/hadamard.py): one thread block per row, every stage in
shared memory, each stage's n values split over the block's threads (TVM inserts the barriers between stages)."""

from __future__ import annotations

from typing import Any

from tvm.s_tir import Schedule

from bitsmith.errors import BitsmithError

MAX_THREADS = 256
SHARED_BYTES = 48 * 1024  # static shared memory of one block on every CUDA_ARCHS chip


def block_threads(n: int) -> int:
    """Threads per row: the largest divisor of n up to 256, so that every thread takes the same number of a
    stage's values (a remainder would put a barrier under a condition, which TVM refuses)."""
    return max(t for t in range(1, min(n, MAX_THREADS) + 1) if n % t == 0)


def schedule_hadamard(func: Any, row_axes: int, stages: list[str]) -> Any:
    """`func`'s output y [.., n]: its first `row_axes` loops fused into blockIdx.x, the `stages` blocks (the
    input prologue, dense factor, butterflies; in order) computed per row in shared memory."""
    name = func.attrs["global_symbol"]
    sch = Schedule(func)
    y = sch.get_sblock("y")
    loops = sch.get_loops(y)
    n = int(sch.get(loops[-1]).extent)
    if shared_bytes(n) > SHARED_BYTES:
        raise BitsmithError(f"{name}: a row of {n} values needs {shared_bytes(n)} bytes of shared memory",
                            where="codegen gpu hadamard", fix=f"rows of at most {SHARED_BYTES // 8} values on a GPU")
    threads = block_threads(n)
    row = sch.fuse(*loops[:row_axes]) if row_axes > 1 else loops[0]
    sch.bind(row, "blockIdx.x")
    for stage in reversed(stages):
        block = sch.get_sblock(stage)
        sch.set_scope(block, 0, "shared")
        sch.compute_at(block, row)
    for stage in stages + ["y"]:
        _bind_threads(sch, sch.get_sblock(stage), threads)
    return sch.mod["main"]


def shared_bytes(n: int) -> int:
    """Shared memory of one row's stages: TVM's storage rewrite reuses a stage's buffer once the next stage has
    read it, so two float32 rows are live at a time (checked by tests/codegen/test_hadamard.py)."""
    return 2 * 4 * n


def _bind_threads(sch: Any, block: Any, threads: int) -> None:
    """The block's loop over n (the innermost, or the one around the dense factor's reduction over b) split
    into [n / threads, threads], threads inner."""
    loops = sch.get_loops(block)
    col = loops[-2] if sch.get(block).init is not None else loops[-1]
    sch.bind(sch.split(col, [None, threads])[1], "threadIdx.x")
