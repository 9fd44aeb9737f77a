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
    tail_vector: bool  # tail runs the VNNI code (L in {4, 8, 16} and every lane in one 32-block)
    xrow: int  # int8 activation bytes per batch row (vector blocks), a multiple of 64
    lrow: int  # lanes per batch row (vector blocks)
    nb32: int  # 32-blocks per row


def _layout(spec: QGemvI8Spec) -> _Layout:
    _, slots = lane_unit(spec.bits)
    planes, block = 8 // spec.bits, LANES * slots
    full, rest = divmod(spec.in_features, block)
    lanes = -(-rest // slots)
    vector = lanes in (4, 8) and all(len({k // XBLOCK for k in ks}) == 1
                                     for ks in (_lane_ks(full * block, lanes, planes, lane, spec.in_features)
                                                for lane in range(lanes)))
    vec_lanes = full * LANES + (lanes if vector else 0)
    return _Layout(planes, block, full, rest, lanes, vector, -(-vec_lanes * 4 * planes // 64) * 64,
                   -(-vec_lanes // 16) * 16, -(-spec.in_features // XBLOCK))


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


def _lane_params(buf: Any, o: Any, first: Any, pattern: list[int]) -> Any:
    """float32 x len(pattern): buf[o, first + pattern[lane]] (fp16 scales or zeros), one vector load."""
    from tvm import tirx
    from tvm.script.ir_builder import tirx as T

    lanes, width = len(pattern), max(pattern) + 1
    if width == 1:
        return T.bind(tirx.Broadcast(tirx.Cast("float32", buf[o, first]), lanes))
    vec = T.bind(tirx.Cast(f"float32x{width}", buf[o, tirx.Ramp(first, 1, width)]))
    return T.bind(tirx.Shuffle([vec] * -(-lanes // width), pattern))  # Shuffle needs lanes <= total


def _build(spec: QGemvI8Spec) -> Any:
    from tvm import tirx
    from tvm.script.ir_builder import IRBuilder
    from tvm.script.ir_builder import tirx as T

    lay = _layout(spec)
    n_out, n_in, batch, bits, group = spec.out_features, spec.in_features, spec.batch, spec.bits, spec.group
    planes, block, full = lay.planes, lay.block, lay.full
    zconst = 1 << (bits - 1)
    base = full * block  # first k of the tail
    xf_row = max(lay.rest, 1)
    f32, i32 = (lambda v: tirx.const(v, "float32")), (lambda v: tirx.const(v, "int32"))

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x = T.arg("x", T.Buffer((batch, n_in), "float32"))
            w = T.arg("qweight", T.Buffer(spec.weight_shape(), "uint32"))
            s = T.arg("scales", T.Buffer((n_out, spec.n_groups), "float16"))
            z = None if spec.sym else T.arg("zeros", T.Buffer((n_out, spec.n_groups), "float16"))
            y = T.arg("y", T.Buffer((batch, n_out), "float32"))
            xq = T.alloc_buffer((batch * lay.xrow,), "int8")  # activation codes in the shuffled byte order
            sxb = T.alloc_buffer((batch * lay.nb32,), "float32")  # scale per 32-block
            sxl = T.alloc_buffer((batch * lay.lrow,), "float32")  # scale per lane
            corr = T.alloc_buffer((batch * lay.lrow,), "int32" if spec.sym else "float32")
            xf = T.alloc_buffer((batch * xf_row,), "float32")  # dequantized tail activations (scalar tail)

            # ---- 1. quantize x: per 32-block scale, codes written where the shuffled weights expect them
            def quantize(n: Any, k0: Any, size: int, store: Any) -> None:
                m = _local((1,), "float32")
                T.buffer_store(m, f32(0.0), [0])
                with T.serial(0, size) as r:
                    T.buffer_store(m, tirx.max(m[0], tirx.abs(x[n, k0 + r])), [0])
                sx = T.bind(m[0] / f32(127.0))
                T.buffer_store(sxb, sx, [n * lay.nb32 + tirx.floordiv(k0, XBLOCK)])
                inv = T.bind(tirx.Select(m[0] > f32(0.0), f32(127.0) / m[0], f32(0.0)))
                with T.serial(0, size) as r:
                    code = tirx.min(tirx.max(T.nearbyint(x[n, k0 + r] * inv), f32(-127.0)), f32(127.0))
                    store(k0 + r, code, sx)

            with T.serial(0, batch) as n:
                def to_full(k: Any, code: Any, _: Any) -> None:
                    pos = tirx.floordiv(k, block) * block + _xpos(tirx.floormod(k, block), LANES, planes)
                    T.buffer_store(xq, tirx.Cast("int8", code), [n * lay.xrow + pos])

                def to_tail(k: Any, code: Any, sx: Any) -> None:
                    if lay.tail_vector:
                        pos = full * block + _xpos(k - base, lay.tail_lanes, planes)
                        T.buffer_store(xq, tirx.Cast("int8", code), [n * lay.xrow + pos])
                    else:
                        T.buffer_store(xf, code * sx, [n * xf_row + k - base])

                if full:
                    with T.serial(0, base // XBLOCK) as b:
                        quantize(n, b * XBLOCK, XBLOCK, to_full)
                if lay.rest and lay.tail_vector:  # padding codes (none for L = 4, 8) stay 0
                    with T.serial(0, 4 * planes * lay.tail_lanes) as r:
                        T.buffer_store(xq, tirx.const(0, "int8"), [n * lay.xrow + base + r])
                for k0 in range(base, n_in, XBLOCK):
                    quantize(n, k0, min(XBLOCK, n_in - k0), to_tail)

                # per lane: its block's scale and zero-point term (-z * sum xq, or sx * sum xq)
                def lane_terms(lane: Any, at: Any, lanes: int, b32: Any) -> None:
                    total = i32(0)
                    for p in range(planes):
                        for t in range(4):
                            total = total + tirx.Cast("int32", xq[n * lay.xrow + at + p * 4 * lanes + t])
                    sx = sxb[n * lay.nb32 + b32]
                    T.buffer_store(sxl, sx, [n * lay.lrow + lane])
                    T.buffer_store(corr, total * i32(-zconst) if spec.sym else sx * tirx.Cast("float32", total),
                                   [n * lay.lrow + lane])

                if full:
                    with T.serial(0, full) as kb, T.serial(0, 4) as c, T.serial(0, 4) as i:
                        b32 = tirx.floordiv(kb * block + LANES * planes * i + 4 * c, XBLOCK)
                        lane_terms(kb * LANES + 4 * c + i, kb * block + 16 * c + 4 * i, LANES, b32)
                if lay.rest and lay.tail_vector:
                    for lane in range(lay.tail_lanes):
                        ks = _lane_ks(base, lay.tail_lanes, planes, lane, n_in)
                        c, i = divmod(lane, 4)
                        lane_terms(full * LANES + lane, base + 16 * c + 4 * i, lay.tail_lanes, ks[0] // XBLOCK)

            # ---- 2. rows in parallel: VNNI dot products per block, fp32 scaling per block
            tile = batch_tile(batch)

            def vector_block(o: Any, nb: Any, acc: Any, words: Any, lanes: int, xat: Any, lat: Any,
                             koffs: list[int], kfirst: Any) -> None:
                """acc[ni, lanes] += this block's terms for the tile's batch rows."""
                codes = _unpack(words, lanes, planes)
                if group >= block or group == n_in:
                    pattern, g0 = [0] * lanes, tirx.floordiv(kfirst, group)
                else:  # several groups per block: lane -> group of its first k
                    pattern, g0 = [kk // group for kk in koffs], tirx.floordiv(kfirst, group)
                scale = _lane_params(s, o, g0, pattern)
                zero = None if z is None else _lane_params(z, o, g0, pattern)
                vdp = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
                for ni in range(tile):
                    n = nb * tile + ni
                    dot = (corr[tirx.Ramp(n * lay.lrow + lat, 1, lanes)] if spec.sym
                           else tirx.Broadcast(i32(0), lanes))
                    for p, code in enumerate(codes):
                        dot = _intrin(f"int32x{lanes}", vdp, dot, code,
                                      xq[tirx.Ramp(n * lay.xrow + xat + p * 4 * lanes, 1, 4 * lanes)])
                    val = tirx.Cast(f"float32x{lanes}", dot) * sxl[tirx.Ramp(n * lay.lrow + lat, 1, lanes)]
                    if zero is not None:
                        val = val - zero * corr[tirx.Ramp(n * lay.lrow + lat, 1, lanes)]
                    at = tirx.Ramp(ni * lanes, 1, lanes)
                    T.buffer_store(acc, acc[at] + val * scale, [at])

            full_koffs = [k - 0 for k in (min(_lane_ks(0, LANES, planes, lane, block)) for lane in range(LANES))]
            tail_koffs = ([min(_lane_ks(base, lay.tail_lanes, planes, lane, n_in), default=base) - base
                           for lane in range(lay.tail_lanes)] if lay.rest and lay.tail_vector else [])
            with T.parallel(0, n_out) as o:
                acc = _local((tile * LANES,), "float32")
                tacc = _local((tile * max(lay.tail_lanes, 1),), "float32")
                with T.serial(0, batch // tile) as nb:
                    T.buffer_store(acc, tirx.Broadcast(f32(0.0), tile * LANES), [tirx.Ramp(0, 1, tile * LANES)])
                    if full:
                        with T.serial(0, full) as kb:
                            if PREFETCH_BYTES:
                                # may point past the row, into the next rows (prefetches never fault)
                                ahead = kb * LANES + PREFETCH_BYTES // 4
                                T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0",
                                                                 tirx.address_of(w[o, ahead]), 0, 3, 1))
                            vector_block(o, nb, acc, w[o, tirx.Ramp(kb * LANES, 1, LANES)], LANES,
                                         kb * block, kb * LANES, full_koffs, kb * block)
                    if lay.rest and lay.tail_vector:
                        lt = lay.tail_lanes
                        T.buffer_store(tacc, tirx.Broadcast(f32(0.0), tile * lt), [tirx.Ramp(0, 1, tile * lt)])
                        vector_block(o, nb, tacc, w[o, tirx.Ramp(full * LANES, 1, lt)], lt, base, full * LANES,
                                     tail_koffs, base)
                    for ni in range(tile):
                        n = nb * tile + ni
                        total = f32(0.0)
                        if full:
                            for lane in range(LANES):
                                total = total + acc[ni * LANES + lane]
                        if lay.rest and lay.tail_vector:
                            for lane in range(lay.tail_lanes):
                                total = total + tacc[ni * lay.tail_lanes + lane]
                        elif lay.rest:
                            total = total + _scalar_tail(spec, lay, w, s, z, xf, o, n * xf_row)
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
