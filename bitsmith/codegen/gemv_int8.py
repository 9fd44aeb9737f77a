"""Quantized GEMV with int8 activations and AVX-512 VNNI integer dot products (x86-64 only).

Same arguments and weight format as GemvSpec (x f32 [batch, in], packed uint32 codes, fp16 scales,
[fp16 zeros], y f32 [batch, out]), but the kernel first quantizes x per 32-value block to int8
(sx = max|x| / 127, xq = rint(x / sx)) and then sums u8 weight codes x s8 activation codes with
`vpdpbusd` (4 byte products per int32 lane) instead of converting every weight to fp32:

    y[n, o] = sum_blocks sx_B * s_g * (sum_{k in B} q_k xq_k  -  z_g sum_{k in B} xq_k)

Why this layout works (b = 4; see packing.py): word l of a 128-value block holds nibble j of
k = 16 j + l. One `vpshufb` transposes each 4x4 byte tile of 16-byte chunks, so int32 lane (c, i)
holds byte i of words 4c..4c+3; masking low / high nibbles (planes p = 0, 1) gives 4 u8 codes at
k = 32 i + 16 p + 4c + t (t = 0..3): every lane covers one 32-block (one activation scale, one
weight group: lane % 4 picks it), so a lane's int32 sum is scaled once per block. b = 8: one plane,
k = 16 i + 4c + t. The activations are quantized once per call into that same byte order, with
per-lane sx (and the zero-point term: -z * sum xq as an int32 start value when symmetric, sx * sum xq
for the fp16 zero when asymmetric), shared by all rows. Per 128 int4 weights: one load, one shuffle,
three mask/shift ops, two vpdpbusd, one int->float and two fp ops (plus the group scale broadcast).

A tail block of L = 4 or 8 lanes (in % block = 32 or 64, e.g. 576 at b = 4) runs the same code on
128/256-bit vectors; other tails (L not a multiple of 4, or a lane spanning two 32-blocks) use a
scalar loop over the dequantized activations. Bits 2/3 and targets without AVX-512 VNNI are refused
(BitsmithError): fall back to GemvSpec (see `int8_activations_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitsmith.codegen.gemv import GROUP_SIZES, MAX_BATCH, GemvSpec
from bitsmith.codegen.gemv_schedule import PREFETCH_BYTES, batch_tile
from bitsmith.codegen.target import Target, resolve_target
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import LANES, lane_unit

I8_BITS = (4, 8)
XBLOCK = 32  # activation values per int8 scale
_FEATURES = ("avx512bw", "avx512vl", "avx512vnni")


def int8_activations_supported(target: Target | str = "host") -> bool:
    """Whether `target` can run QGemvI8Spec kernels (x86-64 with AVX-512 BW/VL and VNNI)."""
    from tvm.target import codegen

    tgt = resolve_target(target)
    if tgt.arch != "x86_64":
        return False
    features = codegen.llvm_get_cpu_features(tgt.tvm_target())
    return all(f in features for f in _FEATURES)


@dataclass(frozen=True)
class QGemvI8Spec:
    """y[batch, out] = x @ dequant(W).T with x quantized to int8 per 32 values inside the kernel.

    Arguments (as GemvSpec): x f32 [batch, in], qweight uint32 [out, words], scales f16 [out, n_groups],
    [zeros f16 [out, n_groups] when not sym], y f32 [batch, out].
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int = -1
    sym: bool = True
    batch: int = 1

    def __post_init__(self) -> None:
        problems = []
        if self.bits not in I8_BITS:
            problems.append(f"bits {self.bits} (int8-activation kernels read {I8_BITS}-bit codes; use GemvSpec)")
        if self.group_size not in GROUP_SIZES:
            problems.append(f"group size {self.group_size} (use one of {GROUP_SIZES})")
        if not 1 <= self.batch <= MAX_BATCH:
            problems.append(f"batch {self.batch} (use 1..{MAX_BATCH})")
        if self.out_features < 1 or self.in_features < 1:
            problems.append(f"shape {self.out_features}x{self.in_features}")
        if problems:
            raise BitsmithError("cannot build an int8-activation GEMV for " + ", ".join(problems),
                                where="codegen gemv_int8", fix="pick a supported kernel description")

    @property
    def gemv(self) -> GemvSpec:
        """The fp32-activation kernel with the same arguments (the fallback)."""
        return GemvSpec(self.out_features, self.in_features, self.bits, self.group_size, self.sym, self.batch)

    @property
    def group(self) -> int:
        return self.gemv.group

    @property
    def n_groups(self) -> int:
        return self.gemv.n_groups

    @property
    def name(self) -> str:
        group = "ch" if self.group_size == -1 else str(self.group_size)
        return (f"qgemv_i8a_b{self.bits}_g{group}_{'sym' if self.sym else 'asym'}"
                f"_n{self.out_features}_k{self.in_features}_bs{self.batch}")

    def weight_shape(self) -> tuple[int, int]:
        return self.gemv.weight_shape()

    def weight_bytes(self) -> int:
        return self.gemv.weight_bytes()

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc (KernelSpec protocol); refuses targets without AVX-512 VNNI."""
        if not int8_activations_supported(target):
            raise BitsmithError(f"{self.name}: target {resolve_target(target).name!r} "
                                f"({resolve_target(target).mcpu}) lacks AVX-512 VNNI",
                                where="codegen gemv_int8", fix="use GemvSpec on this target")
        return _build(self)


# ---------------------------------------------------------------------------------------------
# Layout of one spec: blocks of 16 lanes (+ a tail block), activation scratch offsets


@dataclass(frozen=True)
class _Layout:
    planes: int  # u8 code planes per 32-bit word: 2 nibble planes (b = 4), 1 byte plane (b = 8)
    block: int  # k per full block (128 / 64)
    full: int  # full blocks
    rest: int  # k in the tail block
    tail_lanes: int  # L: lanes of the tail block
    tail_vector: bool  # tail runs the VNNI code (L in {4, 8} and every lane's k in one 32-block)
    nb32: int  # 32-blocks per row


def _layout(spec: QGemvI8Spec) -> _Layout:
    _, slots = lane_unit(spec.bits)
    planes, block = 8 // spec.bits, LANES * slots
    full, rest = divmod(spec.in_features, block)
    lanes = -(-rest // slots)
    vector = lanes in (4, 8) and all(len({k // XBLOCK for k in _lane_ks(full * block, lanes, planes, lane,
                                                                        spec.in_features)}) <= 1
                                     for lane in range(lanes))
    return _Layout(planes, block, full, rest, lanes, vector, -(-spec.in_features // XBLOCK))


def _lane_ks(base: int, lanes: int, planes: int, lane: int, n_in: int) -> list[int]:
    """The k (< n_in) whose codes lane `lane` = 4c + i of a block of `lanes` lanes holds after the shuffle."""
    c, i = divmod(lane, 4)
    return [k for p in range(planes) for t in range(4)
            if (k := base + (planes * i + p) * lanes + 4 * c + t) < n_in]


def _xpos(kk: Any, lanes: int, planes: int) -> Any:
    """Byte offset within a block of `lanes` lanes of the activation for element kk of the block."""
    from tvm import tirx

    j, lane = tirx.floordiv(kk, lanes), tirx.floormod(kk, lanes)
    c, t = tirx.floordiv(lane, 4), tirx.floormod(lane, 4)
    return tirx.floormod(j, planes) * (4 * lanes) + 16 * c + 4 * tirx.floordiv(j, planes) + t


# ---------------------------------------------------------------------------------------------
# Kernel (TIR through the IR builder: explicit vector types and x86 intrinsics)


def _local(shape: tuple[int, ...], dtype: str) -> Any:
    """A small per-thread buffer on the stack: without the annotation TVM 0.27 allocates every
    buffer inside a parallel loop with TVMBackendAllocWorkspace (a call per row) and LLVM cannot keep
    it in registers."""
    from tvm.script.ir_builder import tirx as T

    return T.alloc_buffer(shape, dtype, annotations={"disable_lower_builtin": True})


def _intrin(dtype: str, name: str, *args: Any) -> Any:
    from tvm.script.ir_builder import tirx as T

    return T.call_llvm_pure_intrin(dtype, name, *args)


def _unpack(words: Any, lanes: int, planes: int) -> list[Any]:
    """uint32 x lanes packed words -> per plane an int8 x 4*lanes vector of u8 codes (see module doc)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    nbytes = 4 * lanes
    # per 16-byte chunk: byte 4i + t <- byte 4t + i (in each int32: bytes i, i+4, i+8, i+12)
    idx = (tirx.Ramp(0, 1, lanes) & 3) * 0x01010101 + 0x0C080400
    pshufb = {16: "llvm.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
    shuffled = _intrin(f"int8x{nbytes}", pshufb[nbytes].replace("llvm.ssse3", "llvm.x86.ssse3"),
                       T.reinterpret(words, dtype=f"int8x{nbytes}"), T.reinterpret(idx, dtype=f"int8x{nbytes}"))
    if planes == 1:
        return [T.bind(shuffled)]
    t = T.bind(T.reinterpret(shuffled, dtype=f"uint32x{lanes}"))
    mask = tirx.Broadcast(tirx.const(0x0F0F0F0F, "uint32"), lanes)
    return [T.bind(T.reinterpret(t & mask, dtype=f"int8x{nbytes}")),
            T.bind(T.reinterpret((t >> tirx.Broadcast(tirx.const(4, "uint32"), lanes)) & mask, dtype=f"int8x{nbytes}"))]


def _expand(load: Any, first: Any, pattern: list[int], dtype: str = "float32") -> Any:
    """dtype x len(pattern) vector whose lane l is load(first + pattern[l]): one short vector load and a
    shuffle (a broadcast when the pattern is constant). `load(index)` reads a buffer at index (a Ramp)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    lanes, width = len(pattern), max(pattern) + 1
    if width == 1:
        return T.bind(tirx.Broadcast(tirx.Cast(dtype, load(first)), lanes))
    vec = T.bind(tirx.Cast(f"{dtype}x{width}", load(tirx.Ramp(first, 1, width))))
    return T.bind(tirx.Shuffle([vec] * -(-lanes // width), pattern))  # Shuffle needs lanes <= total


def _hmax(v: Any, lanes: int) -> Any:
    """Largest lane of a float vector (a shuffle tree)."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    while lanes > 1:
        lanes //= 2
        v = T.bind(tirx.max(tirx.Shuffle([v], list(range(lanes))), tirx.Shuffle([v], list(range(lanes, 2 * lanes)))))
    return v


def _build(spec: QGemvI8Spec) -> Any:
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    lay = _layout(spec)
    n_out, n_in, batch, bits, group = spec.out_features, spec.in_features, spec.batch, spec.bits, spec.group
    P, BK, full, L = lay.planes, lay.block, lay.full, lay.tail_lanes
    per_block = BK // XBLOCK  # activation scales per full block
    zconst = 1 << (bits - 1)
    base = full * BK  # first k of the tail
    vtail = lay.rest > 0 and lay.tail_vector
    tail_bytes = 4 * P * L if vtail else 0
    f32, i32 = (lambda v: tirx.const(v, "float32")), (lambda v: tirx.const(v, "int32"))
    tile = batch_tile(batch)

    # scratch offsets: per block, the batch rows side by side (a tile's activations are adjacent; rows
    # `in` bytes apart would alias in L1 at 4 KiB strides)
    def xq_at(n: Any, kb: Any) -> Any:
        return kb * (batch * BK) + n * BK

    def xq_tail(n: Any) -> Any:
        return full * batch * BK + n * tail_bytes

    def lane_at(n: Any, kb: Any) -> Any:
        return kb * (batch * LANES) + n * LANES

    def lane_tail(n: Any) -> Any:
        return full * batch * LANES + n * L

    # per lane: first k (relative to its block), 32-block and group offsets
    full_k = [min(_lane_ks(0, LANES, P, lane, BK)) for lane in range(LANES)]
    tail_k = [min(_lane_ks(base, L, P, lane, n_in), default=base) for lane in range(L)] if vtail else []

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x = T.arg("x", T.Buffer((batch, n_in), "float32"))
            w = T.arg("qweight", T.Buffer(spec.weight_shape(), "uint32"))
            s = T.arg("scales", T.Buffer((n_out, spec.n_groups), "float16"))
            z = None if spec.sym else T.arg("zeros", T.Buffer((n_out, spec.n_groups), "float16"))
            y = T.arg("y", T.Buffer((batch, n_out), "float32"))
            xq = T.alloc_buffer((max(full * batch * BK + batch * tail_bytes, 64),), "int8")  # shuffled order
            sxb = T.alloc_buffer((batch * lay.nb32,), "float32")  # scale per 32-block
            n_lanes = max(full * batch * LANES + (batch * L if vtail else 0), 16)
            sxl = T.alloc_buffer((n_lanes,), "float32")  # scale per lane
            corr = T.alloc_buffer((n_lanes,), "int32" if spec.sym else "float32")  # zero-point term per lane
            xf = T.alloc_buffer((batch * max(lay.rest, 1),), "float32")  # sx * xq of a scalar tail

            # ---- 1. quantize x (once per call, shared by every row)
            def scale_of(n: Any, b32: Any, amax: Any) -> Any:
                T.buffer_store(sxb, amax / f32(127.0), [n * lay.nb32 + b32])
                return T.bind(tirx.Select(amax > f32(0.0), f32(127.0) / amax, f32(0.0)))

            def rint(v: Any) -> Any:
                return tirx.min(tirx.max(T.nearbyint(v), f32(-127.0)), f32(127.0))

            with T.serial(0, batch) as n:
                if full:  # 32 values at a time: 2 vectors of 16 consecutive k = 2 slots of one lane column
                    with T.serial(0, full * per_block) as b:
                        kb, h = tirx.floordiv(b, per_block), tirx.floormod(b, per_block)
                        halves = [T.bind(x[n, tirx.Ramp(b * XBLOCK + 16 * u, 1, 16)]) for u in range(2)]
                        amax = _hmax(T.bind(tirx.max(tirx.abs(halves[0]), tirx.abs(halves[1]))), 16)
                        inv = scale_of(n, b, amax)
                        for u, v in enumerate(halves):
                            q = T.bind(tirx.Cast("int8x16", rint(v * tirx.Broadcast(inv, 16))))
                            j = 2 * h + u  # slot: plane j % P, byte j // P of each word; lanes 4c + t
                            at = xq_at(n, kb) + tirx.floormod(j, P) * 64 + 4 * tirx.floordiv(j, P)
                            for c in range(4):
                                T.buffer_store(xq, tirx.Shuffle([q], list(range(4 * c, 4 * c + 4))),
                                               [tirx.Ramp(at + 16 * c, 1, 4)])
                if vtail:  # padding codes stay 0
                    with T.serial(0, tail_bytes) as r:
                        T.buffer_store(xq, tirx.const(0, "int8"), [xq_tail(n) + r])
                for k0 in range(base, n_in, XBLOCK):  # the tail, one value at a time
                    size = min(XBLOCK, n_in - k0)
                    m = _local((1,), "float32")
                    T.buffer_store(m, f32(0.0), [0])
                    with T.serial(0, size) as r:
                        T.buffer_store(m, tirx.max(m[0], tirx.abs(x[n, k0 + r])), [0])
                    inv = scale_of(n, k0 // XBLOCK, m[0])
                    with T.serial(0, size) as r:
                        code = rint(x[n, k0 + r] * inv)
                        if vtail:
                            T.buffer_store(xq, tirx.Cast("int8", code), [xq_tail(n) + _xpos(k0 - base + r, L, P)])
                        else:
                            T.buffer_store(xf, code * sxb[n * lay.nb32 + k0 // XBLOCK],
                                           [n * max(lay.rest, 1) + k0 - base + r])

                # per lane: its 32-block's scale and the zero-point term (-z * sum xq, or sx * sum xq)
                def lane_terms(lanes: int, xat: Any, lat: Any, b32: Any, pattern: list[int]) -> None:
                    sx = _expand(lambda i: sxb[i], n * lay.nb32 + b32, pattern)
                    T.buffer_store(sxl, sx, [tirx.Ramp(lat, 1, lanes)])
                    total = tirx.Broadcast(i32(0), lanes)
                    ones = tirx.Broadcast(tirx.const(1, "int8"), 4 * lanes)
                    for p in range(P):  # vpdpbusd with u8 ones: per-lane sums of 4 codes
                        total = _intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", total, ones,
                                        xq[tirx.Ramp(xat + p * 4 * lanes, 1, 4 * lanes)])
                    term = (total * tirx.Broadcast(i32(-zconst), lanes) if spec.sym
                            else sx * tirx.Cast(f"float32x{lanes}", total))
                    T.buffer_store(corr, term, [tirx.Ramp(lat, 1, lanes)])

                if full:
                    with T.serial(0, full) as kb:
                        lane_terms(LANES, xq_at(n, kb), lane_at(n, kb), kb * per_block,
                                   [k // XBLOCK for k in full_k])
                if vtail:
                    b0 = min(k // XBLOCK for k in tail_k)
                    lane_terms(L, xq_tail(n), lane_tail(n), b0, [k // XBLOCK - b0 for k in tail_k])

            # ---- 2. rows in parallel: VNNI dot products per block, fp32 scaling per block
            def vector_block(o: Any, nb: Any, acc: Any, words: Any, lanes: int, xat: Any, lat: Any,
                             g0: Any, pattern: list[int]) -> None:
                """acc[ni, lanes] += this block's terms for the tile's batch rows."""
                codes = _unpack(words, lanes, P)
                scale = _expand(lambda i: s[o, i], g0, pattern)
                zero = None if z is None else _expand(lambda i: z[o, i], g0, pattern)
                vdp = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
                for ni in range(tile):
                    n = nb * tile + ni
                    at = tirx.Ramp(lat(n), 1, lanes)
                    dot = corr[at] if spec.sym else tirx.Broadcast(i32(0), lanes)
                    for p, code in enumerate(codes):
                        dot = _intrin(f"int32x{lanes}", vdp, dot, code, xq[tirx.Ramp(xat(n) + p * 4 * lanes, 1, 4 * lanes)])
                    val = tirx.Cast(f"float32x{lanes}", dot) * sxl[at]
                    if zero is not None:
                        val = val - zero * corr[at]
                    here = tirx.Ramp(ni * lanes, 1, lanes)
                    T.buffer_store(acc, acc[here] + val * scale, [here])

            with T.parallel(0, n_out) as o:
                acc = _local((tile * LANES,), "float32")
                tacc = _local((tile * max(L, 1),), "float32")
                with T.serial(0, batch // tile) as nb:
                    T.buffer_store(acc, tirx.Broadcast(f32(0.0), tile * LANES), [tirx.Ramp(0, 1, tile * LANES)])
                    if full:
                        with T.serial(0, full) as kb:
                            if PREFETCH_BYTES:  # may point past the row, into the next rows (never faults)
                                ahead = kb * LANES + PREFETCH_BYTES // 4
                                T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                                 tirx.address_of(w[o, ahead]), 0, 3, 1))
                            if group >= BK or group == n_in:  # one group per block
                                g0, pattern = tirx.floordiv(kb * BK, group), [0] * LANES
                            else:
                                g0, pattern = kb * (BK // group), [k // group for k in full_k]
                            vector_block(o, nb, acc, w[o, tirx.Ramp(kb * LANES, 1, LANES)], LANES,
                                         lambda n: xq_at(n, kb), lambda n: lane_at(n, kb), g0, pattern)
                    if vtail:
                        T.buffer_store(tacc, tirx.Broadcast(f32(0.0), tile * L), [tirx.Ramp(0, 1, tile * L)])
                        g0 = min(k // group for k in tail_k)
                        vector_block(o, nb, tacc, w[o, tirx.Ramp(full * LANES, 1, L)], L, xq_tail, lane_tail,
                                     g0, [k // group - g0 for k in tail_k])
                    for ni in range(tile):
                        n = nb * tile + ni
                        total = f32(0.0)
                        for lane in range(LANES if full else 0):
                            total = total + acc[ni * LANES + lane]
                        for lane in range(L if vtail else 0):
                            total = total + tacc[ni * L + lane]
                        if lay.rest and not vtail:
                            total = total + _scalar_tail(spec, lay, w, s, z, xf, o, n * max(lay.rest, 1))
                        T.buffer_store(y, total, [n, o])
    return ib.get()


def _scalar_tail(spec: QGemvI8Spec, lay: _Layout, w: Any, s: Any, z: Any, xf: Any, o: Any, xat: Any) -> Any:
    """Sum over the tail (any lane count) of s_g (q - z_g) xf_k, one element at a time."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    bits, lanes, base = spec.bits, lay.tail_lanes, lay.full * lay.block
    _, slots = lane_unit(bits)
    acc = _local((1,), "float32")
    T.buffer_store(acc, tirx.const(0.0, "float32"), [0])
    with T.serial(0, slots) as j, T.serial(0, lanes) as lane:
        kk = j * lanes + lane
        with T.If(kk < lay.rest), T.Then():
            code = (w[o, lay.full * LANES + lane] >> tirx.Cast("uint32", j * bits)) & tirx.const((1 << bits) - 1, "uint32")
            g = tirx.floordiv(base + kk, spec.group)
            zero = tirx.const(float(1 << (bits - 1)), "float32") if z is None else tirx.Cast("float32", z[o, g])
            term = (tirx.Cast("float32", code) - zero) * tirx.Cast("float32", s[o, g]) * xf[xat + kk]
            T.buffer_store(acc, acc[0] + term, [0])
    return acc[0]
