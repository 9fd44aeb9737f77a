"""Quantized GEMV with int8 activations and AVX-512 VNNI integer dot products (x86-64 only).

Same arguments and weights as GemvSpec (x f32 [batch, in], packed uint32 codes, fp16 scales, [fp16
zeros], y f32 [batch, out]). The kernel quantizes x per 32 values (sx = max|x| / 127, xq = rint(x * 127
/ max|x|)) and multiplies u8 weight codes by s8 activation codes with `vpdpbusd` (4 byte products per
int32 lane) instead of converting every weight to fp32:
    y[n, o] = sum over 32-blocks B of  sx_B s_g (sum_{k in B} q_k xq_k  -  z_g sum_{k in B} xq_k)
Layout (b = 4, packing.py): word l of a 128-value block holds nibble j of k = 16 j + l. One `vpshufb`
transposes the 4x4 byte tiles of each 16-byte chunk, so int32 lane 4c + i holds byte i of words 4c..4c+3,
and masking low / high nibbles (planes p = 0, 1) leaves 4 u8 codes at k = 32 i + 16 p + 4c + t. Every
lane lies in the 32-block and group of its column i = lane % 4, so per block 4 values (activation
scales, zero-point sums, weight scales) reach the 16 lanes as a 128-bit broadcast. b = 8: one plane,
k = 16 i + 4c + t. Per 128 int4 weights: a load, a shuffle, 3 mask/shift ops, 2 vpdpbusd, int->float,
2 fp ops and the scale conversion: 1.6-2.2x the fp32-dequant kernel in cache (Zen 5), ~DRAM speed.
Once per call x is quantized into that byte order (serial, ~1 us per 4K values) with, per block and
column, sx and the zero-point term: -z sum xq as the int32 start of the lanes c = 0 (sym), or
sx sum xq / (lanes / 4), times the fp16 zero, per lane (asym). Batch rows sit side by side per block;
past ~24 KiB of activations the rows are swept in passes over L1-sized slices of k (a parallel launch
each, y accumulating). Tails of 4 or 8 lanes (in % 128 = 32 or 64 at b = 4, e.g. 576) run the same code
on 128/256-bit vectors, other tails a scalar loop. Bits 2/3 and targets without AVX-512 VNNI are
refused (BitsmithError): use GemvSpec there (`int8_activations_supported`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bitsmith.codegen.gemv import MAX_BATCH, GemvSpec, PackedWeightLayout
from bitsmith.codegen.gemv_schedule import batch_tile
from bitsmith.codegen.target import Target, resolve_target
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import LANES, lane_unit

I8_BITS = (4, 8)
XBLOCK = 32  # activation values per int8 scale
PREFETCH = (8192, 3)  # software prefetch of the codes: (bytes ahead, llvm locality); 0 bytes: none
L1_ACTIVATION_BYTES = 24 << 10  # activations a pass over the rows keeps in L1 (see `_build`)
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
class QGemvI8Spec(PackedWeightLayout):
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
        extra = [] if self.bits in I8_BITS else [
            f"bits {self.bits} (int8-activation kernels read {I8_BITS}-bit codes; use GemvSpec)"]
        if not 1 <= self.batch <= MAX_BATCH:
            extra.append(f"batch {self.batch} (use 1..{MAX_BATCH})")
        problems = self.layout_problems(extra)
        if problems:
            raise BitsmithError("cannot build an int8-activation GEMV for " + ", ".join(problems),
                                where="codegen gemv_int8", fix="pick a supported kernel description")

    @property
    def gemv(self) -> GemvSpec:
        """The fp32-activation kernel with the same arguments (the fallback)."""
        return GemvSpec(self.out_features, self.in_features, self.bits, self.group_size, self.sym, self.batch)

    @property
    def name(self) -> str:
        return f"qgemv_i8a_{self.scheme_tag()}_n{self.out_features}_k{self.in_features}_bs{self.batch}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc (KernelSpec protocol); refuses targets without AVX-512 VNNI."""
        if not int8_activations_supported(target):
            raise BitsmithError(f"{self.name}: target {resolve_target(target).name!r} "
                                f"({resolve_target(target).mcpu}) lacks AVX-512 VNNI",
                                where="codegen gemv_int8", fix="use GemvSpec on this target")
        return _build(self)


def _vector_tail(spec: QGemvI8Spec, full: int, lanes: int, planes: int, block: int) -> bool:
    """Whether the tail block runs the VNNI code: 4 or 8 lanes, each in the 32-block of its column."""
    blocks = [{k // XBLOCK for k in _lane_ks(full * block, lanes, planes, lane, spec.in_features)}
              for lane in range(lanes)]
    return lanes in (4, 8) and all(len(b) <= 1 and b <= (blocks[lane % 4] or b) for lane, b in enumerate(blocks))


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
# TIR through the IR builder: explicit vector types and x86 intrinsics (LLVM 22's vpdpbusd takes
# <N x i8> operands; TVM's own dot_16x4_vnni intrinsic still passes i32 vectors and fails to verify)


def _local(shape: tuple[int, ...], dtype: str) -> Any:
    """A small per-thread stack buffer: without the annotation TVM 0.27 allocates buffers inside a
    parallel loop with TVMBackendAllocWorkspace (a call per row) that LLVM cannot keep in registers."""
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
    pshufb = {16: "llvm.x86.ssse3.pshuf.b.128", 32: "llvm.x86.avx2.pshuf.b", 64: "llvm.x86.avx512.pshuf.b.512"}
    shuffled = _intrin(f"int8x{nbytes}", pshufb[nbytes],
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

    n_out, n_in, batch, bits, group = spec.out_features, spec.in_features, spec.batch, spec.bits, spec.group
    _, slots = lane_unit(bits)
    P, BK = 8 // bits, LANES * slots  # u8 planes per word (nibbles: 2), k per full block (128 / 64)
    full, rest = divmod(n_in, BK)
    L, nb32 = -(-rest // slots), -(-n_in // XBLOCK)  # tail lanes, 32-blocks per row
    per_block = BK // XBLOCK  # activation scales per full block
    zconst = 1 << (bits - 1)
    base = full * BK  # first k of the tail
    vtail = rest > 0 and _vector_tail(spec, full, L, P, BK)
    tail_bytes = 4 * P * L if vtail else 0
    f32, i32 = (lambda v: tirx.const(v, "float32")), (lambda v: tirx.const(v, "int32"))
    tile = batch_tile(batch)
    cdtype = "int32" if spec.sym else "float32"
    # blocks per pass over the rows: a pass's activations (codes + 32 B of scales and sums per block and
    # batch row) stay in L1 while every row of the pass reads them
    chunk = max(1, L1_ACTIVATION_BYTES // (batch * (BK + 32)))
    passes = max(1, -(-full // chunk))

    # scratch: per block (the tail block is number `full`), the batch rows side by side (rows `in` bytes
    # apart would alias in L1); 4 values per block and batch row in sx4 / c4, one per column i
    def xq_at(n: Any, blk: Any) -> Any:
        return (blk * batch + n) * BK

    def meta_at(n: Any, blk: Any) -> Any:
        return (blk * batch + n) * 4

    # per column i (lanes 4c + i share one 32-block and group): first k of the column's lane c = 0
    full_k = [min(_lane_ks(0, LANES, P, i, BK)) for i in range(4)]
    tail_k = [min(_lane_ks(base, L, P, i, n_in), default=base) for i in range(4)] if vtail else []

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x = T.arg("x", T.Buffer((batch, n_in), "float32"))
            w = T.arg("qweight", T.Buffer(spec.weight_shape(), "uint32"))
            s = T.arg("scales", T.Buffer((n_out, spec.n_groups), "float16"))
            z = None if spec.sym else T.arg("zeros", T.Buffer((n_out, spec.n_groups), "float16"))
            y = T.arg("y", T.Buffer((batch, n_out), "float32"))
            xq = T.alloc_buffer(((full + vtail) * batch * BK or 64,), "int8")  # in the shuffled order
            sxb = T.alloc_buffer((batch * nb32,), "float32")  # scale per 32-block
            sx4 = T.alloc_buffer(((full + vtail) * batch * 4 or 4,), "float32")  # activation scales
            c4 = T.alloc_buffer(((full + vtail) * batch * 4 or 4,), cdtype)  # zero-point terms
            xf = T.alloc_buffer((batch * max(rest, 1),), "float32")  # sx * xq of a scalar tail

            # ---- 1. quantize x (once per call, shared by every row)
            def scale_of(n: Any, b32: Any, amax: Any) -> Any:
                T.buffer_store(sxb, amax / f32(127.0), [n * nb32 + b32])
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
                        T.buffer_store(xq, tirx.const(0, "int8"), [xq_at(n, full) + r])
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
                            T.buffer_store(xq, tirx.Cast("int8", code), [xq_at(n, full) + _xpos(k0 - base + r, L, P)])
                        else:
                            T.buffer_store(xf, code * sxb[n * nb32 + k0 // XBLOCK],
                                           [n * max(rest, 1) + k0 - base + r])

                # per block and column i: the activation scale, and the zero-point term: -z * sum xq (sym,
                # added to the lanes of c = 0 as the dot products' start value) or sx * sum xq shared by
                # the column's lanes / 4 lanes (asym, times the fp16 zero)
                def column_terms(lanes: int, xat: Any, meta: Any, b32: Any, pattern: list[int]) -> None:
                    share = 4.0 / lanes  # asym: each of the column's lanes / 4 lanes adds its share
                    sx = _expand(lambda i: sxb[i], n * nb32 + b32, pattern)
                    T.buffer_store(sx4, sx, [tirx.Ramp(meta, 1, 4)])
                    total = tirx.Broadcast(i32(0), lanes)
                    ones = tirx.Broadcast(tirx.const(1, "int8"), 4 * lanes)
                    for p in range(P):  # vpdpbusd with u8 ones: per-lane sums of 4 codes
                        total = _intrin(f"int32x{lanes}", f"llvm.x86.avx512.vpdpbusd.{32 * lanes}", total, ones,
                                        xq[tirx.Ramp(xat + p * 4 * lanes, 1, 4 * lanes)])
                    while lanes > 4:  # lanes 4c + i -> column i
                        lanes //= 2
                        total = T.bind(tirx.Shuffle([total], list(range(lanes)))
                                       + tirx.Shuffle([total], list(range(lanes, 2 * lanes))))
                    term = (total * tirx.Broadcast(i32(-zconst), 4) if spec.sym
                            else sx * tirx.Cast("float32x4", total) * tirx.Broadcast(f32(share), 4))
                    T.buffer_store(c4, term, [tirx.Ramp(meta, 1, 4)])

                if full:
                    with T.serial(0, full) as kb:
                        column_terms(LANES, xq_at(n, kb), meta_at(n, kb), kb * per_block,
                                     [k // XBLOCK for k in full_k])
                if vtail:
                    b0 = min(k // XBLOCK for k in tail_k)
                    column_terms(L, xq_at(n, full), meta_at(n, full), b0, [k // XBLOCK - b0 for k in tail_k])

            # ---- 2. rows in parallel: VNNI dot products per block, fp32 scaling per block
            def vector_block(o: Any, nb: Any, acc: Any, words: Any, lanes: int, blk: Any, g0: Any,
                             pattern: list[int]) -> None:
                """acc[ni, lanes] += this block's terms for the tile's batch rows."""
                codes = _unpack(words, lanes, P)
                cols = [pattern[lane % 4] for lane in range(lanes)]
                scale = _expand(lambda i: s[o, i], g0, cols)
                zero = None if z is None else _expand(lambda i: z[o, i], g0, cols)
                vdp = f"llvm.x86.avx512.vpdpbusd.{32 * lanes}"
                spread = [lane % 4 for lane in range(lanes)]
                for ni in range(tile):
                    n = nb * tile + ni
                    meta = tirx.Ramp(meta_at(n, blk), 1, 4)
                    if spec.sym:  # -z sum xq on the lanes of c = 0
                        dot = c4[meta] if lanes == 4 else tirx.Shuffle(
                            [c4[meta], tirx.Broadcast(i32(0), lanes - 4)], list(range(4)) + [4] * (lanes - 4))
                    else:
                        dot = tirx.Broadcast(i32(0), lanes)
                    for p, code in enumerate(codes):
                        dot = _intrin(f"int32x{lanes}", vdp, dot, code,
                                      xq[tirx.Ramp(xq_at(n, blk) + p * 4 * lanes, 1, 4 * lanes)])
                    val = tirx.Cast(f"float32x{lanes}", dot) * tirx.Shuffle([sx4[meta]] * (lanes // 4), spread)
                    if zero is not None:
                        val = val - zero * tirx.Shuffle([c4[meta]] * (lanes // 4), spread)
                    here = tirx.Ramp(ni * lanes, 1, lanes)
                    T.buffer_store(acc, acc[here] + val * scale, [here])

            def scalar_tail(o: Any, xat: Any) -> Any:
                """Sum over the tail (any lane count) of s_g (q - z_g) sx xq_k, one value at a time."""
                part = _local((1,), "float32")
                T.buffer_store(part, f32(0.0), [0])
                with T.serial(0, slots) as j, T.serial(0, L) as lane:
                    with T.If(j * L + lane < rest), T.Then():
                        code = (w[o, full * LANES + lane] >> tirx.Cast("uint32", j * bits)) & ((1 << bits) - 1)
                        g = tirx.floordiv(base + j * L + lane, group)
                        zero = f32(zconst) if z is None else tirx.Cast("float32", z[o, g])
                        term = (tirx.Cast("float32", code) - zero) * tirx.Cast("float32", s[o, g])
                        T.buffer_store(part, part[0] + term * xf[xat + j * L + lane], [0])
                return part[0]

            def rows(kb0: Any, count: Any, first: Any, last: Any) -> None:
                """y (+)= the blocks kb0 .. kb0 + count - 1 (and the tail when `last`) of every row."""
                with T.parallel(0, n_out) as o:
                    acc = _local((tile * LANES,), "float32")
                    tacc = _local((tile * max(L, 1),), "float32")
                    with T.serial(0, batch // tile) as nb:
                        T.buffer_store(acc, tirx.Broadcast(f32(0.0), tile * LANES), [tirx.Ramp(0, 1, tile * LANES)])
                        if full:
                            with T.serial(0, count) as kk:
                                kb = kb0 + kk
                                if PREFETCH[0]:  # may point past the row, into the next rows (never faults)
                                    T.evaluate(tirx.call_llvm_intrin("void", "llvm.prefetch.p0", tirx.address_of(
                                        w[o, kb * LANES + PREFETCH[0] // 4]), 0, PREFETCH[1], 1))
                                if group >= BK or group == n_in:  # one group per block
                                    g0, pattern = tirx.floordiv(kb * BK, group), [0] * 4
                                else:
                                    g0, pattern = kb * (BK // group), [k // group for k in full_k]
                                vector_block(o, nb, acc, w[o, tirx.Ramp(kb * LANES, 1, LANES)], LANES, kb, g0, pattern)
                        if vtail:
                            T.buffer_store(tacc, tirx.Broadcast(f32(0.0), tile * L), [tirx.Ramp(0, 1, tile * L)])
                            g0 = min(k // group for k in tail_k)
                            with T.If(last), T.Then():
                                vector_block(o, nb, tacc, w[o, tirx.Ramp(full * LANES, 1, L)], L, full, g0,
                                             [k // group - g0 for k in tail_k])
                        for ni in range(tile):
                            n = nb * tile + ni
                            total = f32(0.0)
                            for lane in range(LANES if full else 0):
                                total = total + acc[ni * LANES + lane]
                            for lane in range(L if vtail else 0):
                                total = total + tacc[ni * L + lane]
                            if rest and not vtail:
                                tail = scalar_tail(o, n * max(rest, 1))
                                total = total + tirx.Select(last, tail, f32(0.0))
                            T.buffer_store(y, tirx.Select(first, f32(0.0), y[n, o]) + total, [n, o])

            if passes == 1:
                rows(0, full, tirx.const(True, "bool"), tirx.const(True, "bool"))
            else:  # one parallel launch per pass; y accumulates
                with T.serial(0, passes) as kc:
                    rows(kc * chunk, tirx.min(chunk, full - kc * chunk), kc == 0, kc == passes - 1)
    return ib.get()

