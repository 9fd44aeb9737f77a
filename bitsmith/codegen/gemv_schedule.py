"""CPU schedule of the GEMV kernels: parallel rows, lane-vector accumulators, batch and row tiles."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir import Schedule

BATCH_TILE = 8  # accumulators + partial sums of 8 batch rows fill most of the 32 vector registers
PREFETCH_BYTES = 8192  # software prefetch distance; 8-16 KiB came close to the in-cache speed


@dataclass
class Stages:
    """TE tensors of one kernel and the names of the blocks the scheduler needs."""

    params: list[Any]
    main: str | None  # reduction over full lane blocks, rfactored over the 16 lanes
    inner: str | None  # per-chunk partial dot products (quantized), computed inside `main`'s loops
    tail: str | None  # reduction over the last partial block
    tail_vector: bool  # tail has no predicate: rfactor and vectorize it
    rows: int  # output features
    # streams to prefetch per block step: (buffer name, bytes per element, numerator, denominator,
    # elements per step): block kb starts at element kb * numerator // denominator of its row
    prefetch: tuple[tuple[str, int, int, int, int], ...] = ()
    chunk: int = 0  # slot rows per chunk of `inner`; 1 (groups of 16): inner has no reduction loop


def accumulators(steps: int, batch: int) -> int:
    """Independent vector accumulators per batch row: enough to hide the FMA latency (4 cycles, 2
    per cycle: ~8 chains in flight) without running out of the 32 vector registers at large batch."""
    acc = 1
    while acc * 2 <= steps and steps % (acc * 2) == 0 and acc * 2 * batch <= 8:
        acc *= 2
    return acc


def row_tile(n_out: int, batch: int) -> int:
    """Output rows computed together, sharing each activation load: 2 when the row count is even and
    the tile's accumulators fit the registers. At batch 4 the activations (64 KiB at 4096 columns)
    spill L1 and the loads from L2 bound the kernel; two rows halve them."""
    return 2 if n_out % 2 == 0 and batch_tile(batch) * 2 <= BATCH_TILE else 1


def batch_tile(batch: int, most: int | None = None) -> int:
    """Batch rows computed together: the largest divisor of batch <= most (default BATCH_TILE)."""
    return max(t for t in range(1, min(batch, most or BATCH_TILE) + 1) if batch % t == 0)


def _lane_rfactor(sch: Any, block: Any, acc_loop: Any, lane_loop: Any) -> tuple[Any, Any, int]:
    """rfactor a reduction over (accumulator, lane) into rf[n, o, acc * lanes] (factor_axis=2 keeps
    the lanes last, much faster than factor_axis=0), and when acc > 1 rfactor the final sum once more so
    that the accumulators are first added lane-wise: a single 64-lane scalar sum let LLVM spill it through
    the stack with store-forwarding stalls."""
    acc = sch.get(acc_loop).extent.value
    rf = sch.rfactor(sch.fuse(acc_loop, lane_loop), factor_axis=2)
    rf2 = None
    if acc > 1:
        _, lanes = sch.split(sch.get_loops(block)[-1], [acc, None])
        rf2 = sch.rfactor(lanes, factor_axis=2)
    return rf, rf2, acc


def _place_lane_sum(sch: Any, rf2: Any, block: Any, row: Any) -> None:
    """Put the accumulator sum (vectorized over lanes) and the horizontal sum in the row loop."""
    if rf2 is not None:
        sch.reverse_compute_at(rf2, row)
        lane, *n, acc = sch.get_loops(rf2)[1:]  # lane, [batch (dropped when 1)], accumulator
        sch.reorder(*n, acc, lane)
        sch.vectorize(lane)
    sch.reverse_compute_at(block, row)


def schedule_gemv(func: Any, st: Stages, batch: int) -> Any:
    """Rows in parallel; per row, vector accumulators over contiguous k and weights read once per batch.

    Loop nest per output row o (parallel), per tile of batch rows:  acc[n, a, lanes] = 0
        for each block and chunk: inner[n, lanes] = sum over the chunk's slot rows (unrolled; codes are
        decoded once per tile and FMA'd into every batch row's partial sum); acc[n, a] += s * inner[n]
    then y[n, o] = horizontal sum of sum_a acc[n, a] (+ the tail block, accumulated the same way).
    Chunks go round-robin to `a` accumulators so FMA latency does not serialize the row; init blocks
    are split off (decompose_reduction) so no zero-init branch stays in the hot loop.
    """
    sch = Schedule(func)
    row = None
    tile = batch_tile(batch)
    decompose = []  # last: init blocks break the compact dataflow that compute_at needs
    if st.main is not None:
        main = sch.get_sblock(st.main)
        n, o, kb, co, ci, lb = sch.get_loops(main)
        rf, rf2, acc = _lane_rfactor(sch, main, ci, lb)
        n, o, kb, co, fused = sch.get_loops(rf)
        ci, lb = sch.split(fused, [acc, None])
        # batch rows in tiles: a tile's accumulators stay in registers, codes are decoded once per tile
        nb, ni = sch.split(n, [None, tile])
        oo, oi = sch.split(o, [None, row_tile(st.rows, batch)])
        sch.reorder(oo, nb, kb, co, ci, oi, ni, lb)
        for loop in (co, ci, oi, ni):
            sch.unroll(loop)
        sch.vectorize(lb)
        row = oo
        if st.inner is not None:
            inner = sch.get_sblock(st.inner)
            sch.compute_at(inner, ci)
            new = sch.get_loops(inner)[5:]  # below o, nb, kb, co, ci: [n, o,] lane, [t] (unit loops dropped)
            if st.chunk > 1:
                l_i, t_i = new[-2:]
                sch.reorder(t_i, *new[:-2], l_i)
                for loop in (t_i, *new[:-2]):
                    sch.unroll(loop)
                decompose.append((inner, t_i))
            else:  # one slot row per chunk: a product, no reduction
                l_i = new[-1]
                for loop in new[:-1]:
                    sch.unroll(loop)
            sch.vectorize(l_i)
            names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
            if "xchunk" in names:
                # per-chunk activation sums: once per call, 16 lanes at a time (LLVM gathers otherwise)
                xc = sch.get_sblock("xchunk")
                xc_rf = sch.rfactor(sch.get_loops(xc)[-1], factor_axis=3)
                sch.vectorize(sch.get_loops(xc_rf)[-1])  # loops: n, block, chunk, row, lane
            else:  # the min form's per-lane chunk sums (gemv._quant_stages): once per call, lanes as the vector
                xl = sch.get_sblock("xlanes")
                *_, lane, t = sch.get_loops(xl)
                sch.reorder(t, lane)
                sch.vectorize(lane)
                decompose.append((xl, t))
            # corr_f32 (the min form's corrections, gemv._quant_stages) reads scale_f32: placed first
            for name in ("corr_f32", "scale_f32"):
                if name in names:
                    # the row tile's fp32 scales (and corrections), once per row in vectors of up to 16 groups:
                    # per block (a few groups) the two-level and min forms cost 1.34x int4 g32 sym in cache, per
                    # row 1.15x (bench/kernels.md)
                    scale = sch.get_sblock(name)
                    sch.compute_at(scale, row)
                    groups = sch.get_loops(scale)[-1]
                    extent = sch.get(groups).extent.value
                    width = next(w for w in (16, 8, 4, 2, 1) if extent % w == 0)
                    if width > 1:
                        sch.vectorize(sch.split(groups, [None, width])[1] if extent > width else groups)
        decompose.append((rf, kb))
        _place_lane_sum(sch, rf2, main, row)
    main_row = row is not None
    if st.tail is not None:
        tail = sch.get_sblock(st.tail)
        n, o, jt, lt = sch.get_loops(tail)
        if st.tail_vector and sch.get(lt).extent.value > 1 and sch.get(jt).extent.value > 1:
            slots = sch.get(jt).extent.value
            jo, ji = sch.split(jt, [None, accumulators(slots // 2, tile)])  # >= 2 steps: no unit loop
            tail_rf, rf2, acc = _lane_rfactor(sch, tail, ji, lt)
            if row is None:  # no full block: the tail's own row loop is the parallel one
                n, row, _ = sch.get_loops(tail)
                sch.reorder(row, n)
                for block in (rf2, tail_rf):
                    if block is not None:
                        sch.compute_at(block, row)
            else:
                sch.reverse_compute_at(tail_rf, row)
            fused, *n, jo = sch.get_loops(tail_rf)[1:]  # rf lane, [batch (dropped when 1)], slot rows
            ji, lt = sch.split(fused, [acc, None])
            sch.reorder(jo, *n, ji, lt)
            for loop in (jo, *n, ji):
                sch.unroll(loop)
            sch.vectorize(lt)
            decompose.append((tail_rf, jo))
            if main_row:
                _place_lane_sum(sch, rf2, tail, row)
            elif rf2 is not None:
                lane, *n, a = sch.get_loops(rf2)[1:]
                sch.reorder(*n, a, lane)
                sch.vectorize(lane)
        elif row is None:  # a short scalar reduction per row (odd in_features below one block)
            sch.reorder(o, n)
            row = o
        else:
            sch.reverse_compute_at(tail, row)
    sch.parallel(row)
    for block, loop in decompose:
        sch.decompose_reduction(block, loop)
    func = sch.mod["main"]
    if st.main is not None and st.prefetch and PREFETCH_BYTES:
        func = _prefetch(func, sch.get(kb).loop_var, sch.get(row).loop_var, row_tile(st.rows, batch), st.prefetch)
    return func


def _prefetch(func: Any, kb: Any, row: Any, rows: int, streams: tuple[tuple[str, int, int, int, int], ...]) -> Any:
    """Prefetch each stream PREFETCH_BYTES ahead at every block step.

    Without it the kernel ran far below its in-cache speed from DRAM: ~40 instructions per 64-byte line
    of codes keep too few loads in flight for the hardware prefetcher alone. Addresses past a row run into the
    next rows (rows are contiguous), which are the ones computed next; prefetches never fault.
    """
    def calls(loop: Any) -> list[Any]:
        buffers: dict[str, Any] = {}
        _read_buffers(loop.body, buffers)
        out = []
        for name, elem, num, den, step in streams:
            if name not in buffers:  # read once per row, before the block loop (the row's scales)
                continue
            for r in range(rows):
                for off in range(0, step, 64 // elem):  # one per cache line
                    col = kb * num // den + off + PREFETCH_BYTES // elem
                    addr = tirx.address_of(tirx.BufferLoad(buffers[name], [row * rows + r, col]))
                    out.append(tirx.Evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", addr, 0, 3, 1)))
        return out

    return func.with_body(_insert_at_loop(func.body, kb, calls))


def _children(stmt: Any) -> list[Any]:
    if isinstance(stmt, tirx.For):
        return [stmt.body]
    if isinstance(stmt, tirx.SeqStmt):
        return list(stmt.seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        return [stmt.block]
    if isinstance(stmt, s_tir.SBlock):
        return [stmt.body] + ([stmt.init] if stmt.init is not None else [])
    return []


def _read_buffers(stmt: Any, out: dict[str, Any]) -> None:
    if isinstance(stmt, s_tir.SBlock):
        out.update({region.source.name: region.source for region in stmt.reads})
    for child in _children(stmt):
        _read_buffers(child, out)


def _insert_at_loop(stmt: Any, var: Any, make: Any) -> Any:
    """`stmt` with make(loop) prepended to the body of the loop over `var` (TVM 0.27 has no Python
    statement mutator: rebuild the For / SeqStmt / block nodes on the path)."""
    if isinstance(stmt, tirx.For):
        body = (tirx.SeqStmt([*make(stmt), stmt.body]) if stmt.loop_var.same_as(var)
                else _insert_at_loop(stmt.body, var, make))
        if body.same_as(stmt.body):
            return stmt
        return tirx.For(stmt.loop_var, stmt.min, stmt.extent, stmt.kind, body, stmt.thread_binding,
                        stmt.annotations, getattr(stmt, "step", None))
    if isinstance(stmt, tirx.SeqStmt):
        seq = [_insert_at_loop(s, var, make) for s in stmt.seq]
        return stmt if all(a.same_as(b) for a, b in zip(seq, stmt.seq)) else tirx.SeqStmt(seq)
    if isinstance(stmt, s_tir.SBlockRealize):
        block = _insert_at_loop(stmt.block, var, make)
        return stmt if block.same_as(stmt.block) else s_tir.SBlockRealize(stmt.iter_values, stmt.predicate, block)
    if isinstance(stmt, s_tir.SBlock):
        body = _insert_at_loop(stmt.body, var, make)
        if body.same_as(stmt.body):
            return stmt
        return s_tir.SBlock(stmt.iter_vars, stmt.reads, stmt.writes, stmt.name_hint, body, stmt.init,
                            stmt.alloc_buffers, stmt.match_buffers, stmt.annotations)
    return stmt
