"""Helpers shared by the small kernel families (elementwise, norms, rope, embeddings): spec checks (`refuse`,
through which every kernel spec refuses a bad description), the rmsnorm stages their CPU and GPU kernels
share, and the plain CPU schedule they all use: rows in parallel once there is enough work to pay for the
thread launch, the innermost contiguous loop vectorized by `target.lanes(4)` with a scalar remainder
loop, per-row sums in `lanes` vector accumulators.
"""

from __future__ import annotations

from typing import Any

from tvm import te, tirx
from tvm.s_tir import Schedule

from bitsmith.codegen.dequant import f32  # noqa: F401  (re-exported: widen a load to float32)

# below this many elements a kernel runs on one thread: a parallel launch costs microseconds, what one
# core needs for ~32K floats. A guess, not tuned (on the loaded 2-core dev box parallel rmsnorm and add
# kernels lost at 37K-143K elements, bench/kernels.md); retune on a quiet machine.
PARALLEL_MIN = 1 << 15
MAX_VECTOR = 256  # widest whole-loop vector (vectorize_part)


def fconst(value: float) -> Any:
    return tirx.const(value, "float32")


def finish(func: Any, name: str) -> Any:
    return func.with_attr("global_symbol", name)


def rms_stages(src: Any, w: Any, rows: int, dim: int, eps: float) -> Any:
    """y = src / sqrt(sum(src^2) / dim + eps) * w, with the per-row stages `ss` and `den` (TE)."""
    k = te.reduce_axis((0, dim), "k")
    ss = te.compute((rows,), lambda r: te.sum(src[r, k] * src[r, k], axis=k), name="ss")
    den = te.compute((rows,), lambda r: tirx.sqrt(ss[r] / fconst(dim) + fconst(eps)), name="den")
    return te.compute((rows, dim), lambda r, d: src[r, d] / den[r] * f32(w[d]), name="y")


def vectorize_inner(sch: Any, loop: Any, lanes: int) -> Any | None:
    """Vectorize `loop` `lanes` at a time; a remainder that `lanes` does not divide becomes a scalar
    loop after it (loop_partition). Returns the loop over whole vectors (None when shorter than one).

    Call it last for the block: partitioning copies the block, so earlier handles to it go stale.
    """
    extent = int(sch.get(loop).extent)
    main = extent - extent % lanes
    if main == 0 or lanes == 1:
        return loop if lanes == 1 else None
    if main < extent:
        loop = sch.loop_partition(loop, [main])[0]  # the rest is the second part
    outer, inner = sch.split(loop, [None, lanes])
    sch.vectorize(inner)
    return outer


def vectorize_part(sch: Any, loop: Any, lanes: int) -> None:
    """Vectorize a loop_partition part: from 0 as `vectorize_inner`; a later part (split needs a loop
    from 0) as one vector of its whole extent (LLVM cuts it into registers) when that is short."""
    if int(sch.get(loop).min) == 0:
        vectorize_inner(sch, loop, lanes)
    elif int(sch.get(loop).extent) <= MAX_VECTOR:
        sch.vectorize(loop)


def worth_parallel(elements: int) -> bool:
    return elements >= PARALLEL_MIN


def schedule_rows(func: Any, block: str, rows: int, cols: int, lanes: int, per_row: tuple[str, ...] = (),
                  lead: str | None = None) -> Any:
    """Schedule a [rows, cols] output block: rows in parallel (when worth it), cols vectorized.

    `per_row` names producer blocks (per-row reductions and scalars) to compute inside the row loop,
    consumers first. With `lead` (a [rows, cols] output block that produces the rest, which an output
    block cannot be moved with compute_at) the row loop is lead's, and the others follow it there.
    A single row of a pure elementwise block (no `per_row`) runs its vectors in parallel instead.
    """
    sch = Schedule(func)
    # reductions are rfactored before they move (rfactor under a compute_at loop fails in 0.27)
    reductions = {name: _rfactor_lanes(sch, sch.get_sblock(name), lanes) for name in per_row}
    if lead is None:
        row = sch.get_loops(sch.get_sblock(block))[0]
        for name in per_row:
            rf = reductions[name]
            for moved in [sch.get_sblock(name)] + ([] if rf is None else [rf]):
                sch.compute_at(moved, row)
    else:
        row = sch.get_loops(sch.get_sblock(lead))[0]
        for name in reversed(per_row):
            rf = reductions[name]
            for moved in ([] if rf is None else [rf]) + [sch.get_sblock(name)]:
                sch.reverse_compute_at(moved, row)
        sch.reverse_compute_at(sch.get_sblock(block), row)
    parallel = worth_parallel(rows * cols)
    if parallel and rows > 1:
        sch.parallel(row)
    if lead is not None:
        vectorize_inner(sch, sch.get_loops(sch.get_sblock(lead))[-1], lanes)
    outer = vectorize_inner(sch, sch.get_loops(sch.get_sblock(block))[-1], lanes)
    if parallel and rows == 1 and not per_row and outer is not None:
        sch.parallel(outer)
    # last: init blocks break the compact dataflow that parallel needs
    for name in per_row:
        _finish_reduction(sch, sch.get_sblock(name), reductions[name])
    return sch.mod["main"]


def _rfactor_lanes(sch: Any, block: Any, lanes: int) -> Any | None:
    """For a per-row sum over a contiguous axis that `lanes` divides: rfactor it into `lanes` vector
    accumulators (one horizontal sum at the end). None when it stays a scalar loop (or is no sum)."""
    loops = sch.get_loops(block)
    if len(loops) < 2 or sch.get(block).init is None or lanes == 1:
        return None
    extent = int(sch.get(loops[-1]).extent)
    if extent % lanes or extent < 2 * lanes:
        return None
    _, ki = sch.split(loops[-1], [None, lanes])
    rf = sch.rfactor(ki, factor_axis=1)
    # rfactor puts the lane iter first; last instead, so that compute_at makes it the innermost loop
    n_iters = len(sch.get(rf).iter_vars)
    sch.reorder_block_iter_var(rf, list(range(1, n_iters)) + [0])
    return rf


def _finish_reduction(sch: Any, block: Any, rf: Any | None) -> None:
    """Vectorize the rfactor block's lane loop; split each reduction's zero-init off its loop."""
    if sch.get(block).init is None:
        return  # a per-row scalar
    if rf is not None:
        *_, ko, lane = sch.get_loops(rf)
        sch.vectorize(lane)
        sch.decompose_reduction(rf, ko)
    sch.decompose_reduction(block, sch.get_loops(block)[-1])


def schedule_flat(func: Any, n: int, lanes: int, block: str = "y") -> Any:
    """A 1-D elementwise block: vectors of `lanes` (split over threads when worth it), scalar remainder."""
    sch = Schedule(func)
    (loop,) = sch.get_loops(sch.get_sblock(block))
    outer = vectorize_inner(sch, loop, lanes)
    if outer is not None and worth_parallel(n):
        sch.parallel(outer)
    return sch.mod["main"]
