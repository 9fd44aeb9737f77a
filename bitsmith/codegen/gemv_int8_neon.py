"""The TIR of the int8-activation GEMV (QGemvI8Spec) for aarch64 with the dot-product extension (`sdot`).

Same arguments, weights and activation quantization as the VNNI kernel (gemv_int8_tir.py): x is quantized
per 32 values (sx = max|x| / 127, xq = rint(x * 127 / max|x|)), and
    y[n, o] = sum over 32-blocks B of  sx_B s_g (sum_{k in B} q_k xq_k  -  z_g sum_{k in B} xq_k).
`sdot` multiplies 16 signed bytes by 16 signed bytes and adds each group of 4 products to one int32 lane
(4 lanes per 128-bit register). Layout (packing.py): word l of a block of BK = 16 S values holds slot j of
k = 16 j + l. The 16 words of a block are 4 registers (c = 0..3, words 4c..4c+3); a constant byte shuffle
(`tbl`) transposes the 4x4 byte tiles of each, so int32 lane i holds byte i of words 4c..4c+3:
    b = 4: plane p (low / high nibble) of lane i, byte t  ->  k = 32 i + 16 p + 4 c + t   (lane i: 32-block i)
    b = 8: lane i, byte t                                 ->  k = 16 i + 4 c + t          (half a 32-block)
so every lane of the block's 4 P sdot results lies in one 32-block and one group (groups >= 32). Codes are
unsigned: int4 codes (0..15) are valid signed bytes; int8 codes are flipped to q - 128 (an `eor`) and the
zero point becomes z - 128 (with `+i8mm`, `usdot` takes the unsigned codes as they are). Per block and
batch row: 4 P sdot in two chains, one int->float conversion, a multiply by the lane scales sx, an FMA
with the weight scales; the zero-point term -(z - off) sum xq starts the int32 chains (sym) or is
subtracted in float per lane (asym). Once per call x is quantized into that byte order, with per lane sx
and sum xq. Output rows run in parallel, each with all batch rows (a block's codes are unpacked once for
every row). A tail (in % BK) of whole 32-blocks in L = 4 or 8 lanes (576 = 4 x 128 + 64 at b = 4) is one more
block of L / 4 registers per plane (lane i: P L values); any other tail a scalar loop on fp32 x.

Bytes per token: the loop reads each weight byte once and the activations from L1, so a GEMV is bound by
DRAM bandwidth once the codes (BK / 2 bytes per block at b = 4) arrive slower than ~4 P sdot and ~10 other
NEON ops per block retire (bench/neon.md has the prediction).
"""

from __future__ import annotations

from typing import Any

from tvm import tirx
from tvm.script.ir_builder import IRBuilder
from tvm.script.ir_builder import tirx as T

from bitsmith.codegen.vnni_ir import expand_lanes, hmax, llvm_intrin, local_buffer, qgemv_i8_args
from bitsmith.errors import BitsmithError
from bitsmith.runtime.packed_layout import LANES, lane_unit

XBLOCK = 32  # activation values per int8 scale (as the VNNI kernel)
SDOT = "llvm.aarch64.neon.sdot.v4i32.v16i8"
USDOT = "llvm.aarch64.neon.usdot.v4i32.v16i8"  # u8 x s8 (FEAT_I8MM)
# per 16-byte register: byte 4 i + t <- byte 4 t + i (int32 lane i gets byte i of 4 consecutive words)
TRANSPOSE = [4 * t + i for i in range(4) for t in range(4)]


def emulated_dot(acc: Any, a: Any, b: Any, unsigned_a: bool = False) -> Any:
    """What sdot / usdot (`unsigned_a`: a's bytes are u8) compute (int32x4 acc + per lane the sum of 4 byte
    products), in portable TIR: lets the same kernel run on the build machine to check its indexing (tests),
    where the intrinsic does not exist."""
    a = T.reinterpret(a, dtype="uint8x16") if unsigned_a else a
    prod = tirx.Cast("int32x16", a) * tirx.Cast("int32x16", b)
    return acc + sum((tirx.Shuffle([prod], [4 * i + t for i in range(4)]) for t in range(1, 4)),
                     tirx.Shuffle([prod], [4 * i for i in range(4)]))


def build_qgemv_i8_neon(spec: Any, usdot: bool = False, emulate: bool = False) -> Any:
    """The PrimFunc of a QGemvI8Spec for aarch64 +dotprod (`usdot`: +i8mm, int8 codes unflipped; `emulate`: no
    intrinsics, for checking the kernel on another machine). The module docstring describes it."""
    n_out, n_in, batch, bits, group = spec.out_features, spec.in_features, spec.batch, spec.bits, spec.group
    _, slots = lane_unit(bits)
    P, BK = 8 // bits, LANES * slots  # planes per byte (nibbles: 2), k per block (128 / 64)
    full, rest = divmod(n_in, BK)
    span = BK // 4  # k per int32 lane of a block (32 / 16)
    if group != n_in and group % span:
        raise BitsmithError(f"group size {group} splits a lane of {span} values", where=f"codegen {spec.name}",
                            fix="use groups of 32, 64 or 128 or per channel")
    per_block = BK // XBLOCK
    # a tail of L = 4 or 8 lanes whose values fill whole 32-blocks (576 = 4 x 128 + 64 at b = 4) runs as one
    # more block of L / 4 registers: lane i covers P L values k = base + P L i + .., one 32-block and group
    L = rest // slots
    vtail = rest > 0 and rest % XBLOCK == 0 and L in (4, 8)
    tail_span = P * L
    unsigned = usdot and bits == 8  # usdot: u8 codes as they are; else int8 codes flip to q - 128
    off = 128 if bits == 8 and not unsigned else 0
    zconst = 1 << (bits - 1)
    dot_name = USDOT if unsigned else SDOT
    f32, i32 = (lambda v: tirx.const(v, "float32")), (lambda v: tirx.const(v, "int32"))
    cdtype = "int32" if spec.sym else "float32"

    def sdot(acc: Any, codes: Any, act: Any) -> Any:
        if emulate:
            return emulated_dot(acc, codes, act, unsigned)
        return llvm_intrin("int32x4", dot_name, acc, codes, act)

    def xq_at(n: Any, kb: Any) -> Any:  # a block's activation codes, the batch rows of a block side by side
        return (kb * batch + n) * BK

    def meta_at(n: Any, kb: Any) -> Any:  # its 4 lane scales / zero-point terms
        return (kb * batch + n) * 4

    with IRBuilder() as ib:
        with T.prim_func():
            T.func_name(spec.name)
            T.func_attr({"global_symbol": spec.name, "tirx.noalias": True})
            x, w, s, z, y = qgemv_i8_args(spec)
            nblk = full + vtail  # blocks with a vector step (the tail block is number `full`)
            xq = T.alloc_buffer((max(nblk * batch * BK, 16),), "int8")  # in the transposed byte order
            sx4 = T.alloc_buffer((max(nblk * batch * 4, 4),), "float32")  # per block and lane: sx
            c4 = T.alloc_buffer((max(nblk * batch * 4, 4),), cdtype)  # per block and lane: zero-point term

            # ---- 1. quantize x's full blocks (once per call, shared by every output row)
            def rint(v: Any) -> Any:
                return tirx.min(tirx.max(T.nearbyint(v), f32(-127.0)), f32(127.0))

            def quantize_block(n: Any, kb: Any, k0: Any, n32: int, lanes: int) -> None:
                """xq / sx4 / c4 of block kb (first k k0, n32 32-blocks, `lanes` words: register p R + c, byte
                4 i + t holds slot P i + p of word 4 c + t, k = k0 + (P i + p) lanes + 4 c + t)."""
                regs, lane_k = lanes // 4, P * lanes  # registers per plane, k per int32 lane
                sxl = local_buffer((n32,), "float32")
                for h in range(n32):  # a 32-block: 2 registers of 16 consecutive k
                    halves = [T.bind(x[n, tirx.Ramp(k0 + h * XBLOCK + 16 * u, 1, 16)]) for u in range(2)]
                    amax = hmax(T.bind(tirx.max(tirx.abs(halves[0]), tirx.abs(halves[1]))), 16)
                    T.buffer_store(sxl, amax / f32(127.0), [h])
                    inv = T.bind(tirx.Select(amax > f32(0.0), f32(127.0) / amax, f32(0.0)))
                    for u, v in enumerate(halves):
                        q = T.bind(tirx.Cast("int8x16", rint(v * tirx.Broadcast(inv, 16))))
                        for e in range(4):  # 4 consecutive k: slot j, words 4 c .. 4 c + 3
                            j, c = divmod(h * XBLOCK + 16 * u + 4 * e, lanes)
                            at = xq_at(n, kb) + ((j % P) * regs + c // 4) * 16 + 4 * (j // P)
                            T.buffer_store(xq, tirx.Shuffle([q], list(range(4 * e, 4 * e + 4))),
                                           [tirx.Ramp(at, 1, 4)])
                # per lane i: its 32-block's sx and sum xq over its k (sdot with ones: sums of 4 bytes)
                sx = expand_lanes(lambda i: sxl[i], 0, [i * lane_k // XBLOCK for i in range(4)])
                T.buffer_store(sx4, sx, [tirx.Ramp(meta_at(n, kb), 1, 4)])
                total = tirx.Broadcast(i32(0), 4)
                ones = tirx.Broadcast(tirx.const(1, "int8"), 16)
                for v in range(regs * P):
                    total = sdot(total, ones, xq[tirx.Ramp(xq_at(n, kb) + 16 * v, 1, 16)])
                term = (T.bind(total) * tirx.Broadcast(i32(off - zconst), 4) if spec.sym
                        else sx * tirx.Cast("float32x4", total))
                T.buffer_store(c4, term, [tirx.Ramp(meta_at(n, kb), 1, 4)])

            with T.serial(0, batch) as n:
                with T.serial(0, full) as kb:
                    quantize_block(n, kb, kb * BK, per_block, LANES)
                if vtail:
                    quantize_block(n, full, full * BK, rest // XBLOCK, L)

            # ---- 2. output rows in parallel: per block, 4 P sdot per batch row and one float step
            def block_codes(o: Any, kb: Any, lanes: int = LANES) -> list[Any]:
                """The block's codes as R P int8x16 registers (R = lanes / 4), register R p + c (see the module
                docstring)."""
                regs = lanes // 4
                codes: list[Any] = [None] * (regs * P)
                for c in range(regs):
                    words = w[o, tirx.Ramp(kb * LANES + 4 * c, 1, 4)]
                    tile = T.bind(tirx.Shuffle([T.reinterpret(words, dtype="uint8x16")], TRANSPOSE))
                    if P == 2:
                        mask = tirx.Broadcast(tirx.const(0x0F, "uint8"), 16)
                        planes = [tile & mask, tile >> tirx.Broadcast(tirx.const(4, "uint8"), 16)]
                    elif off:
                        planes = [tirx.bitwise_xor(tile, tirx.Broadcast(tirx.const(0x80, "uint8"), 16))]
                    else:
                        planes = [tile]
                    for p, plane in enumerate(planes):
                        codes[regs * p + c] = T.bind(T.reinterpret(plane, dtype="int8x16"))
                return codes

            with T.parallel(0, n_out) as o:
                acc = local_buffer((batch * 4,), "float32")
                T.buffer_store(acc, tirx.Broadcast(f32(0.0), batch * 4), [tirx.Ramp(0, 1, batch * 4)])
                def block_step(kb: Any, codes: list[Any], k0: Any, lane_k: int) -> None:
                    """acc[n] += block kb's terms for every batch row: lane i covers k0 + lane_k i + [0, lane_k)."""
                    if group >= BK or group == n_in:  # one group per block
                        g0, pattern = tirx.floordiv(k0, group), [0] * 4
                    else:
                        g0, pattern = tirx.floordiv(k0, group), [i * lane_k // group for i in range(4)]
                    scale = expand_lanes(lambda g: s[o, g], g0, pattern)
                    zero = None if z is None else T.bind(
                        expand_lanes(lambda g: z[o, g], g0, pattern) - tirx.Broadcast(f32(float(off)), 4))
                    with T.serial(0, batch) as n:
                        meta = tirx.Ramp(meta_at(n, kb), 1, 4)
                        chains = [c4[meta] if spec.sym else tirx.Broadcast(i32(0), 4), tirx.Broadcast(i32(0), 4)]
                        for v, code in enumerate(codes):  # two chains: sdot latency
                            chains[v % 2] = sdot(chains[v % 2], code, xq[tirx.Ramp(xq_at(n, kb) + 16 * v, 1, 16)])
                        val = tirx.Cast("float32x4", chains[0] + chains[1]) * sx4[meta]
                        if zero is not None:
                            val = val - zero * c4[meta]
                        here = tirx.Ramp(n * 4, 1, 4)
                        T.buffer_store(acc, acc[here] + val * scale, [here])

                with T.serial(0, full) as kb:
                    block_step(kb, block_codes(o, kb), kb * BK, span)
                if vtail:
                    block_step(full, block_codes(o, full, L), full * BK, tail_span)
                with T.serial(0, batch) as n:
                    total = hsum4(acc[tirx.Ramp(n * 4, 1, 4)])
                    if rest and not vtail:
                        total = total + scalar_tail(spec, x, w, s, z, o, n, full * BK, rest, slots)
                    T.buffer_store(y, total, [n, o])
    return ib.get()


def hsum4(v: Any) -> Any:
    """The sum of a float32x4's lanes (two shuffle-adds: `faddp`)."""
    v = T.bind(tirx.Shuffle([v], [0, 1]) + tirx.Shuffle([v], [2, 3]))
    return tirx.Shuffle([v], [0]) + tirx.Shuffle([v], [1])


def scalar_tail(spec: Any, x: Any, w: Any, s: Any, z: Any, o: Any, n: Any, base: int, rest: int, slots: int) -> Any:
    """Sum over the tail block (L = ceil(rest / S) lanes, slot j of lane l: k = base + j L + l) of
    s_g (q - z_g) x_k on fp32 x: a few values per row, exact."""
    bits, lanes = spec.bits, -(-rest // slots)
    part = local_buffer((1,), "float32")
    T.buffer_store(part, tirx.const(0.0, "float32"), [0])
    with T.serial(0, slots) as j, T.serial(0, lanes) as lane:
        k = base + j * lanes + lane
        with T.If(k < spec.in_features), T.Then():
            code = (w[o, (base // (LANES * slots)) * LANES + lane] >> tirx.Cast("uint32", j * bits)) & ((1 << bits) - 1)
            g = tirx.floordiv(k, spec.group)
            zero = tirx.const(float(1 << (bits - 1)), "float32") if z is None else tirx.Cast("float32", z[o, g])
            term = (tirx.Cast("float32", code) - zero) * tirx.Cast("float32", s[o, g])
            T.buffer_store(part, part[0] + term * x[n, k], [0])
    return part[0]
