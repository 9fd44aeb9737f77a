"""Fused dequantize + GEMV kernels (y = x @ dequant(W).T) for CPUs, written in TE and scheduled in TIR; on a GPU
the spec builds gpu/matmul.py's kernel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tvm import te, tirx

from bitsmith.codegen.dequant import GroupParams, f32, unpack_code, weight_placeholder
from bitsmith.codegen.gemv_schedule import Stages, accumulators, batch_tile, row_tile, schedule_gemv
from bitsmith.codegen.gpu.matmul import matmul_func, matmul_reference
from bitsmith.codegen.spec_checks import DENSE_BITS, refuse
from bitsmith.codegen.target import Target
from bitsmith.runtime.packed_layout import LANES, PACK_BITS, lane_unit, packed_shape

GROUP_SIZES = (16, 32, 64, 128, -1)
SUPER_GROUPS = (0, 256)  # two-level scales: int8 codes per group x fp16 per 256 columns (GGUF K-quants)
PARAM_BYTES = {"float16": 2, "int8": 1}
MAX_BATCH = 16
DENSE_SLOTS = 8  # dense kernels: up to 8 independent vector accumulators per row


class PackedWeightLayout:
    """What a dequant-matmul kernel reads for W, shared by GemvSpec and GemmSpec.

    Needs the fields out_features, in_features, bits (PACK_BITS packed, or 16/32 dense), group_size
    (-1: per channel), sym, bf16 (16-bit dense weights are bfloat16, not float16), offset (the min form
    w = s*q + m, `zeros` holding m) and super_group (256: scales, and in min form zeros, are int8 codes times
    fp16 super_scales / super_zeros per 256 columns); see dequant.GroupParams for what each form computes.
    """

    out_features: int
    in_features: int
    bits: int
    group_size: int
    sym: bool
    # class defaults for the families of packed weights that lack the fields (QGemvI8Spec: plain forms only)
    bf16: bool = False
    offset: bool = False
    super_group: int = 0

    def layout_problems(self, extra: list[str]) -> list[str]:
        """Unsupported bits, group size, `extra` (the family's own checks) and shape, in that order."""
        problems = []
        if self.bits not in PACK_BITS and self.bits not in DENSE_BITS:
            problems.append(f"bits {self.bits} (use {PACK_BITS} or 16/32 for dense fp16/bf16/fp32 weights)")
        elif self.bf16 and self.bits != 16:
            problems.append(f"bf16 with bits {self.bits} (bfloat16 weights are 16-bit dense: bits 16)")
        if self.is_quantized and self.group_size not in GROUP_SIZES:
            problems.append(f"group size {self.group_size} (use one of {GROUP_SIZES})")
        if self.offset and (self.sym or not self.is_quantized):
            problems.append("the min form (offset) of symmetric or dense weights (it is asymmetric: sym False)")
        if self.super_group not in SUPER_GROUPS or (self.super_group and not self.is_quantized):
            problems.append(f"super group {self.super_group} (use 0, or 256 with packed weights)")
        elif self.super_group and (self.group_size < 1 or self.super_group % self.group_size):
            problems.append(f"super group {self.super_group} with group size {self.group_size} (groups must divide it)")
        elif self.super_group and not (self.sym or self.offset):
            problems.append("super groups with zero points (asym): two-level scales are sym or min form (K-quants)")
        problems += extra
        if self.out_features < 1 or self.in_features < 1:
            problems.append(f"shape {self.out_features}x{self.in_features}")
        return problems

    @property
    def is_quantized(self) -> bool:
        return self.bits in PACK_BITS

    @property
    def dense_dtype(self) -> str:
        """The stored dtype of dense weights: float32, float16 or bfloat16 (meaningless when quantized)."""
        return "bfloat16" if self.bf16 else DENSE_BITS.get(self.bits, "")

    @property
    def group(self) -> int:
        """Values per scale group (the whole row when group_size is -1)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return -(-self.in_features // self.group)

    @property
    def form(self) -> str:
        return "sym" if self.sym else ("min" if self.offset else "asym")

    def param_specs(self) -> list[tuple[str, tuple[int, int], str]]:
        """(name, shape, dtype) of the group parameters after qweight: scales, [zeros], [super_scales],
        [super_zeros] (the kernel's arguments in that order, as the artifact stores them)."""
        groups, two = (self.out_features, self.n_groups), bool(self.super_group)
        specs = [("scales", groups, "int8" if two else "float16")]
        if not self.sym:
            specs.append(("zeros", groups, "int8" if two and self.offset else "float16"))
        if two:
            supers = (self.out_features, -(-self.in_features // self.super_group))
            specs += [(name, supers, "float16") for name in ("super_scales", "super_zeros")[:1 + self.offset]]
        return specs

    def scheme_tag(self) -> str:
        """The weight part of a kernel name: float16 / bfloat16 / float32, or b4_g32_sym, b3_gch_asym,
        b4_g32_min_s256, ..."""
        if not self.is_quantized:
            return self.dense_dtype
        group = "ch" if self.group_size == -1 else str(self.group_size)
        return f"b{self.bits}_g{group}_{self.form}" + (f"_s{self.super_group}" if self.super_group else "")

    def weight_shape(self) -> tuple[int, int]:
        if self.is_quantized:
            return packed_shape(self.out_features, self.in_features, self.bits)
        return self.out_features, self.in_features

    def weight_bytes(self) -> int:
        """Bytes the kernel reads for W (codes + scales, zeros and super scales), the GB/s numerator."""
        rows, cols = self.weight_shape()
        if not self.is_quantized:
            return rows * cols * (self.bits // 8)
        return rows * cols * 4 + sum(a * b * PARAM_BYTES[dtype] for _, (a, b), dtype in self.param_specs())


@dataclass(frozen=True)
class GemvSpec(PackedWeightLayout):
    """One kernel: y[batch, out] = x[batch, in] @ W.T, W packed `bits`-bit codes or dense fp32/fp16/bf16."""

    out_features: int
    in_features: int
    bits: int
    group_size: int = -1
    sym: bool = True
    batch: int = 1
    bf16: bool = False  # bits 16: the dense weights are bfloat16 (carried as uint16, see runtime/kernel_dtypes.py)
    offset: bool = False  # min form (see PackedWeightLayout)
    super_group: int = 0  # 256: two-level scales (see PackedWeightLayout)

    def __post_init__(self) -> None:
        batch = [] if 1 <= self.batch <= MAX_BATCH else [f"batch {self.batch} (use 1..{MAX_BATCH})"]
        refuse(self.layout_problems(batch), "GEMV")

    @property
    def name(self) -> str:
        shape = f"n{self.out_features}_k{self.in_features}_bs{self.batch}"
        return f"{'q' if self.is_quantized else ''}gemv_{self.scheme_tag()}_{shape}"

    def prim_func(self, target: Target) -> Any:
        """The PrimFunc scheduled for `target`, a CPU or a GPU (KernelSpec protocol): x, W, [scales, [zeros],
        [super_scales], [super_zeros]], y."""
        return matmul_func(self) if target.is_gpu else _lower(self, target)

    def gpu_definition(self) -> Any:
        """The GPU kernel's unscheduled PrimFunc (gpu/matmul.py); built for a CPU it checks the GPU semantics."""
        return matmul_reference(self)


# ---------------------------------------------------------------------------------------------
# Compute definitions (TE)


def _quant_stages(spec: GemvSpec) -> Stages:
    """y = sum_chunks (s_g * sum_{k in chunk} x_k (2^b + q_k) - c_g * sum_{k in chunk} x_k) + tail.

    Full 16-lane blocks are cut into chunks of C slot rows (C*16 consecutive k) that lie in one group,
    so the scale multiplies a chunk's vector of partial sums once instead of every weight. Codes are
    decoded as 2^b + q (no int->float conversion, see `dequant.unpack_code`); the zero point (or offset)
    and that bias become one correction c_g (dequant.GroupParams) per chunk from the chunk's activation sum
    (computed once per call, shared by all rows). sym and asym fold it into the chunk's sum as
    (2^b + z) * sum x before the scale (c_g = s_g (2^b + z)); the min form (c_g = s_g 2^b - m_g, no factor s_g
    to pull out) adds c_g * sum x after it. The tail block (L lanes, k = base + j*L + l) dequantizes per
    element: s x (2^b + q) - c x when each slot row lies in one group and no lane is padding, else
    s q - c(bias 0) with the padding masked.
    """
    n_out, n_in, bits, batch = spec.out_features, spec.in_features, spec.bits, spec.batch
    units, slots = lane_unit(bits)
    full, rest = divmod(n_in, LANES * slots)
    tail_lanes = -(-rest // slots)
    group = spec.group
    # chunk = C slot rows; in full blocks a group covers whole slot rows (groups are multiples of 16)
    chunk = slots if spec.group_size == -1 or group >= LANES * slots else group // LANES
    per_block = slots // chunk
    x = te.placeholder((batch, n_in), "float32", name="x")
    w = te.placeholder(spec.weight_shape(), "uint32", name="qweight")
    gp = GroupParams.of(spec, [te.placeholder(shape, dtype, name=name) for name, shape, dtype in spec.param_specs()])
    params = [x, w] + [t for t in (gp.scales, gp.zeros, gp.super_scales, gp.super_zeros) if t is not None]
    z = gp.zeros if not spec.offset else None  # folded into the chunk sums (sym: the constant 2^(b-1))
    zconst = float(1 << (bits - 1))

    def zero(o: Any, g: Any) -> Any:
        return tirx.const(zconst, "float32") if z is None else f32(z[o, g])

    bias = float(1 << bits)  # full blocks decode codes as 2^b + q (see dequant.unpack_code)
    main = None
    if full:
        def kidx(b: Any, c: Any, t: Any, lane: Any) -> Any:  # element k of block b, chunk c, row t
            return b * LANES * slots + (c * chunk + t) * LANES + lane

        tt, ll = te.reduce_axis((0, chunk), "tt"), te.reduce_axis((0, LANES), "ll")
        if not spec.offset:
            # -sum(x) / 16 per chunk (times 2^b + z when z is a constant): each of the 16 lane
            # accumulators takes 1/16 of the correction
            xscale = -((bias + zconst) if spec.sym else 1.0) / LANES
            xc = te.compute((batch, full, per_block), lambda n, b, c: te.sum(
                x[n, kidx(b, c, tt, ll)] * tirx.const(xscale, "float32"), axis=[tt, ll]), name="xchunk")
        else:  # min form: -sum(x) per chunk and lane, so its correction is one vector FMA per chunk in main
            xc = te.compute((batch, full, per_block, LANES), lambda n, b, c, lane: te.sum(
                -x[n, kidx(b, c, tt, lane)], axis=[tt]), name="xlanes")
        def group_of(b: Any, c: Any) -> Any:
            return (b * LANES * slots + c * chunk * LANES) // group

        # groups of 16: a chunk is one slot row, and inner a plain product (a unit reduction axis would
        # vanish from the loop nest the schedule expects)
        t2 = te.reduce_axis((0, chunk), "t2") if chunk > 1 else tirx.const(0, "int32")

        def inner_body(n: Any, o: Any, b: Any, c: Any, lane: Any) -> Any:
            term = x[n, kidx(b, c, t2, lane)] * unpack_code(w, o, b * LANES * units, c * chunk + t2, lane, LANES,
                                                            bits, True)
            if not spec.offset:  # the min form's correction is added after the scale (main_body)
                corr = xc[n, b, c] if z is None else xc[n, b, c] * (zero(o, group_of(b, c)) + bias)
                # the correction rides on the first step (an FMA's addend once fast-math-nsz drops the 0 + )
                term = term + (tirx.Select(t2 == 0, corr, tirx.const(0.0, "float32")) if chunk > 1 else corr)
            return te.sum(term, axis=[t2]) if chunk > 1 else term

        inner = te.compute((batch, n_out, full, per_block, LANES), inner_body, name="inner")
        # fp32 scales (and min-form corrections) of the row, computed once per block instead of once per chunk
        # and accumulator
        sf = te.compute((n_out, spec.n_groups), lambda o, g: gp.scale(o, g), name="scale_f32")
        cf = te.compute((n_out, spec.n_groups), lambda o, g: gp.correction(o, g, bias, sf[o, g]),
                        name="corr_f32") if spec.offset else None
        # chunk c = co * acc + ci: `acc` chunks of a block go to separate accumulators
        acc = accumulators(per_block, batch_tile(batch) * row_tile(n_out, batch))
        kb, co, ci, lb = (te.reduce_axis((0, full), "kb"), te.reduce_axis((0, per_block // acc), "co"),
                          te.reduce_axis((0, acc), "ci"), te.reduce_axis((0, LANES), "lb"))

        def main_body(n: Any, o: Any) -> Any:
            cb = co * acc + ci
            g = group_of(kb, cb)
            term = sf[o, g] * inner[n, o, kb, cb, lb]
            # min form: xc is -sum(x) per chunk and lane; the lane accumulators add up -c * sum(x)
            return te.sum(term if cf is None else term + cf[o, g] * xc[n, kb, cb, lb], axis=[kb, co, ci, lb])

        main = te.compute((batch, n_out), main_body, name="main")

    out = main
    tail_vector = True
    if rest:
        base, wbase = full * LANES * slots, full * LANES * units
        jt, lt = te.reduce_axis((0, slots), "jt"), te.reduce_axis((0, tail_lanes), "lt")
        pred = None if rest == slots * tail_lanes else jt * tail_lanes + lt < rest
        tail_vector = pred is None

        # a slot row of L lanes lies in one group when L divides the group size and the tail's start:
        # then its scale index has no lane term and vectorizes to a broadcast instead of a gather
        row_in_group = group % tail_lanes == 0 and base % tail_lanes == 0
        fast = row_in_group and pred is None

        def tail_term(n: Any, o: Any) -> Any:
            k = base + jt * tail_lanes + lt
            g = (base + jt * tail_lanes) // group if row_in_group else k // group
            sc = gp.scale(o, g)
            if fast:  # s x (2^b + q) - c x: decoded as in full blocks
                code = unpack_code(w, o, wbase, jt, lt, tail_lanes, bits, True)
                if not spec.offset:  # s (x (2^b + q) - x (2^b + z)): for a constant z, x (2^b + z) does not
                    # depend on the row and LLVM hoists it out of the row loop
                    return sc * (x[n, k] * code - x[n, k] * (zero(o, g) + bias))
                return sc * (x[n, k] * code) - gp.correction(o, g, bias, sc) * x[n, k]
            dq = unpack_code(w, o, wbase, jt, lt, tail_lanes, bits) * sc - gp.correction(o, g, 0.0, sc)
            term = x[n, k if pred is None else tirx.min(k, n_in - 1)] * dq
            # te.sum's `where` is dropped by create_prim_func: mask the padding slots explicitly
            return term if pred is None else tirx.if_then_else(pred, term, 0.0)

        out = _with_tail(main, tail_term, jt, lt, (batch, n_out))
    # per block step: 16 U words of codes, 16 S / G groups of scales (and zeros); not the super scales (one
    # element per 256 columns: a cache line lasts 32 x 256 columns)
    streams = [("qweight", 4, LANES * units, 1, LANES * units)]
    streams += [(name, PARAM_BYTES[dtype], LANES * slots, group, 1)
                for name, _, dtype in spec.param_specs() if not name.startswith("super")]
    return Stages(params + [out], "main" if main is not None else None, "inner" if main is not None else None,
                  out.op.name if rest else None, tail_vector, n_out, tuple(streams), chunk)


def _dense_stages(spec: GemvSpec, lanes: int) -> Stages:
    """y = x @ W.T for fp32/fp16/bf16 W: blocks of DENSE_SLOTS x `lanes` k, then a tail."""
    n_out, n_in, batch = spec.out_features, spec.in_features, spec.batch
    x = te.placeholder((batch, n_in), "float32", name="x")
    w = weight_placeholder((n_out, n_in), spec.dense_dtype, "weight")
    acc = accumulators(DENSE_SLOTS, batch_tile(batch) * row_tile(n_out, batch))
    step = acc * lanes
    full, rest = divmod(n_in, step)
    main = None
    if full:
        kb, co, ci, lb = (te.reduce_axis((0, full), "kb"), te.reduce_axis((0, 1), "co"),
                          te.reduce_axis((0, acc), "ci"), te.reduce_axis((0, lanes), "lb"))
        main = te.compute((batch, n_out), lambda n, o: te.sum(
            x[n, kb * step + ci * lanes + lb] * f32(w[o, kb * step + ci * lanes + lb]), axis=[kb, co, ci, lb]),
            name="main")
    out = main
    if rest:
        tail_lanes = lanes if rest % lanes == 0 else 1
        jt, lt = te.reduce_axis((0, rest // tail_lanes), "jt"), te.reduce_axis((0, tail_lanes), "lt")
        k0 = full * step

        def tail_term(n: Any, o: Any) -> Any:
            return x[n, k0 + jt * tail_lanes + lt] * f32(w[o, k0 + jt * tail_lanes + lt])

        out = _with_tail(main, tail_term, jt, lt, (batch, n_out))
    return Stages([x, w, out], "main" if main is not None else None, None,
                   out.op.name if rest else None, True, n_out)


def _with_tail(main: Any, term: Any, jt: Any, lt: Any, shape: tuple[int, int]) -> Any:
    """y = main + the tail's sum, as one reduction that folds main in at its first step.

    Reading main makes the tail a consumer of the row loop that computes main, so reverse_compute_at
    can place it per row (a separate tail block has no producer to tie it to a row).
    """
    if main is None:
        return te.compute(shape, lambda n, o: te.sum(term(n, o), axis=[jt, lt]), name="y")
    first = tirx.all(jt == 0, lt == 0)
    return te.compute(shape, lambda n, o: te.sum(
        term(n, o) + tirx.Select(first, main[n, o], tirx.const(0.0, "float32")), axis=[jt, lt]), name="y")


# ---------------------------------------------------------------------------------------------
# Build


def _lower(spec: GemvSpec, target: Target) -> Any:
    stages = _quant_stages(spec) if spec.is_quantized else _dense_stages(spec, target.lanes(4))
    func = te.create_prim_func(stages.params)
    func = schedule_gemv(func, stages, spec.batch)
    return func.with_attr("global_symbol", spec.name)
