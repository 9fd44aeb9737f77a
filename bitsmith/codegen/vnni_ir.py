"""IR-builder helpers for hand-written x86 vector kernels: LLVM intrinsics, code unpacking, lane shuffles, sums.

TIR through the IR builder with explicit vector types: LLVM 22's vpdpbusd takes <N x i8> operands, and
TVM's own dot_16x4_vnni intrinsic still passes i32 vectors and fails to verify. Used by gemv_int8.py (and
`fold_rows`, target-neutral, by paged_attention.py).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script.ir_builder import tirx as T


def qgemv_i8_args(spec: Any) -> tuple[Any, Any, Any, Any, Any]:
    """Inside a `T.prim_func()` frame: the arguments of a QGemvI8Spec kernel in the artifact's standard packed
    layout, x [batch, in], qweight, scales [out, groups], zeros (asymmetric only, else None), y [batch, out]."""
    n_out, n_in, batch = spec.out_features, spec.in_features, spec.batch
    x = T.arg("x", T.Buffer((batch, n_in), "float32"))
    w = T.arg("qweight", T.Buffer(spec.weight_shape(), "uint32"))
    s = T.arg("scales", T.Buffer((n_out, spec.n_groups), "float16"))
    z = None if spec.sym else T.arg("zeros", T.Buffer((n_out, spec.n_groups), "float16"))
    y = T.arg("y", T.Buffer((batch, n_out), "float32"))
    return x, w, s, z, y


def local_buffer(shape: tuple[int, ...], dtype: str) -> Any:
    """A small per-thread stack buffer: without the annotation TVM 0.27 allocates buffers inside a
    parallel loop with TVMBackendAllocWorkspace (a call per row) that LLVM cannot keep in registers."""
    return T.alloc_buffer(shape, dtype, annotations={"disable_lower_builtin": True})


def llvm_intrin(dtype: str, name: str, *args: Any) -> Any:
    """A pure LLVM intrinsic call returning `dtype`."""
    return T.call_llvm_pure_intrin(dtype, name, *args)


def prefetch(load: Any, locality: int = 3) -> None:
    """Prefetch the cache line of `load` (a BufferLoad: only its address is used; never faults, so the
    address may run past its row or buffer)."""
    T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(load), 0, locality, 1))


def unpack_codes(words: Any, lanes: int, planes: int) -> list[Any]:
    """uint32 x lanes packed words -> per plane an int8 x 4*lanes vector of u8 codes: one `vpshufb` transposes
    the 4x4 byte tiles of each 16-byte chunk (int32 lane 4c + i <- byte i of words 4c..4c+3), then 4-bit codes
    split into the low / high nibble planes (gemv_int8.py's module docstring has the resulting k order)."""
    nbytes = 4 * lanes
    # per 16-byte chunk: byte 4i + t <- byte 4t + i (in each int32: bytes i, i+4, i+8, i+12)
    idx = (tirx.Ramp(0, 1, lanes) & 3) * 0x01010101 + 0x0C080400
    pshufb = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
    shuffled = llvm_intrin(f"int8x{nbytes}", pshufb[nbytes],
                           T.reinterpret(words, dtype=f"int8x{nbytes}"), T.reinterpret(idx, dtype=f"int8x{nbytes}"))
    if planes == 1:
        return [T.bind(shuffled)]
    t = T.bind(T.reinterpret(shuffled, dtype=f"uint32x{lanes}"))
    mask = tirx.Broadcast(tirx.const(0x0F0F0F0F, "uint32"), lanes)
    return [T.bind(T.reinterpret(t & mask, dtype=f"int8x{nbytes}")),
            T.bind(T.reinterpret((t >> tirx.Broadcast(tirx.const(4, "uint32"), lanes)) & mask, dtype=f"int8x{nbytes}"))]


def expand_lanes(load: Any, first: Any, pattern: list[int], dtype: str = "float32") -> Any:
    """dtype x len(pattern) vector whose lane l is load(first + pattern[l]): one short vector load and a
    shuffle (a broadcast when the pattern is constant). `load(index)` reads a buffer at index (a Ramp)."""
    lanes, width = len(pattern), max(pattern) + 1
    if width == 1:
        return T.bind(tirx.Broadcast(tirx.Cast(dtype, load(first)), lanes))
    vec = T.bind(tirx.Cast(f"{dtype}x{width}", load(tirx.Ramp(first, 1, width))))
    return T.bind(tirx.Shuffle([vec] * -(-lanes // width), pattern))  # Shuffle needs lanes <= total


def hmax(v: Any, lanes: int) -> Any:
    """Largest lane of a float vector (a shuffle tree)."""
    while lanes > 1:
        lanes //= 2
        v = T.bind(tirx.max(tirx.Shuffle([v], list(range(lanes))), tirx.Shuffle([v], list(range(lanes, 2 * lanes)))))
    return v


def fold_rows(vectors: list[Any], lanes: int) -> tuple[Any, list[int]]:
    """The lane sums of several (at most `lanes`) float vectors by halving trees that pair vectors up: per
    level, one add of two shuffles folds two vectors of s segments into one of 2s half-width segments (~3
    ops per row in all, where summing lane by lane costs ~2 ops per lane and row and serializes on the
    adds). Returns the last vector, one lane per segment, and the row each lane holds (-1: padding)."""
    zero = tirx.Broadcast(tirx.const(0.0, "float32"), lanes)
    rows = len(vectors)
    vecs, width = list(vectors), lanes  # every vector: lanes // width segments of `width` lanes
    while len(vecs) > 1 and width > 1:
        if len(vecs) % 2:
            vecs.append(zero)
        half, segs = width // 2, lanes // width
        lo = [s * width + e for s in range(segs) for e in range(half)]
        hi = [i + half for i in lo]
        vecs = [T.bind(tirx.Shuffle([a, b], lo + [lanes + i for i in lo])
                       + tirx.Shuffle([a, b], hi + [lanes + i for i in hi])) for a, b in zip(vecs[::2], vecs[1::2])]
        width = half
    order = segment_rows(rows, lanes)
    (v,) = vecs if len(vecs) == 1 else (None,)
    if v is None:  # more rows than lanes: not used (tiles have at most 8 rows)
        raise ValueError(f"{rows} rows of {lanes} lanes")
    count = len(order)
    while width > 1:  # fold each segment onto its first half
        half = width // 2
        v = T.bind(tirx.Shuffle([v], [s * width + e for s in range(count) for e in range(half)])
                   + tirx.Shuffle([v], [s * width + half + e for s in range(count) for e in range(half)]))
        width = half
    return v, order


def row_sums(vectors: list[Any], lanes: int) -> list[Any]:
    """The lane sum of each float vector as a scalar (see `fold_rows`)."""
    v, order = fold_rows(vectors, lanes)
    return [v] if len(order) == 1 else [tirx.Shuffle([v], [order.index(r)]) for r in range(len(vectors))]


def segment_rows(rows: int, lanes: int) -> list[int]:
    """Which row each segment of `fold_rows`' last vector holds (-1: padding), in segment order."""
    vecs, width = [[r] for r in range(rows)], lanes
    while len(vecs) > 1 and width > 1:
        if len(vecs) % 2:
            vecs.append([-1] * len(vecs[0]))
        vecs = [a + b for a, b in zip(vecs[::2], vecs[1::2])]
        width //= 2
    return vecs[0]
