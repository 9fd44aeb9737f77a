"""Lowering of `linear` / `qlinear` for lower_to_kernels: which matmul kernel a node gets, and its bias add."""

from __future__ import annotations

import math
from typing import Any

from bitsmith.codegen import families as k
from bitsmith.codegen.gemv_int8 import I8_MAX_BATCH
from bitsmith.codegen.gemv_x16 import x16_problems
from bitsmith.codegen.spec_checks import DENSE_DTYPE_BITS, imported_form_problems
from bitsmith.compiler.ir import Node, TensorType
from bitsmith.compiler.ops.quant import qlinear_input_names
from bitsmith.runtime.interleave import x16_name

GEMM_MIN_ROWS = 16  # from here the dequant-GEMM beats the batched GEMV per token (bench/kernels.md)


def matmul_spec(k: Any, n_out: int, n_in: int, bits: int, group: int, sym: bool, rows: int,
                int8_activations: bool = False, bf16: bool = False, arch: str = "x86_64", offset: bool = False,
                super_group: int = 0) -> Any:
    """Few rows: the fused dequant-GEMV (reads each weight byte once), with int8 activations and VNNI
    dot products for 4/8-bit weights when allowed (bandwidth-bound instead of FMA-bound); from
    GEMM_MIN_ROWS rows the dequant-GEMM (a weight tile dequantized once, then an FMA micro-kernel).
    The VNNI kernel also beats the GEMM on many rows, where it transposes 4 blocks of codes at a time
    (chunks): on SmolLM2's int4 layers at 16 and 64 rows, on its int8 lm_head at 16 and ties it at 64
    (bench/kernels.md), so it takes every row count it has. Where rows are a multiple of 16 and inputs of
    32 the interleaved-layout kernel (QGemvX16Spec) takes its place: it reads the weights from DRAM in less
    time at 4-64 rows and the same at 1 (bench/serve.md). On aarch64 (`arch`, a +dotprod CPU) the int8 path is
    QGemvI8Spec with sdot at every row count (there is no interleaved aarch64 kernel; bench/neon.md).
    The forms of imported weights (the min form `offset`, two-level scales `super_group`, groups of 16, 5/6 bits)
    have float32-activation kernels only: the caller says so (lower_linear) before asking for int8 ones."""
    if int8_activations and bits in (4, 8) and rows <= I8_MAX_BATCH and not imported_form_problems(
            bits, group, offset, super_group):
        if arch == "aarch64":
            return k.QGemvI8Spec(n_out, n_in, bits, group, sym, rows)
        if not x16_problems(n_out, n_in, bits, group):
            return k.QGemvX16Spec(n_out, n_in, bits, group, sym, rows)
        return k.QGemvI8Spec(n_out, n_in, bits, group, sym, rows)
    if rows >= GEMM_MIN_ROWS:
        return k.GemmSpec(n_out, n_in, bits, group, sym, rows, bf16, offset, super_group)
    return k.GemvSpec(n_out, n_in, bits, group, sym, rows, bf16, offset, super_group)


def lower_linear(st: Any, node: Node) -> None:
    """Emit the matmul (and bias) kernels of a `linear` / `qlinear` node into `st` (lower_to_kernels._Lowering)."""
    ins, out, a = node.inputs, node.outputs[0], node.attrs
    x_shape = st.shape(ins[0])
    rows = math.prod(x_shape[:-1])
    x = None  # the matmul's activations: x itself, or its gathered columns (act-order)
    if node.op == "linear":
        dtype = st.weight_dtype(ins[1], node)
        if dtype not in DENSE_DTYPE_BITS:
            raise st.unsupported(node, f"has {dtype} weights; dense matmul kernels read "
                                       f"{', '.join(DENSE_DTYPE_BITS)}")
        n_out, n_in = st.fn.types[ins[1]].shape
        spec = matmul_spec(k, n_out, n_in, DENSE_DTYPE_BITS[dtype], -1, True, rows, bf16=dtype == "bfloat16")
        weights, bias = [st.arg(ins[1])], ins[2] if len(ins) == 3 else None
    else:
        n_out, n_in = st.fn.types[ins[1]].shape[0], a["in_features"]
        inputs = dict(zip(qlinear_input_names(a), ins[1:]))
        form = {"offset": a.get("offset", False), "super_group": a.get("super_group", 0)}
        i8 = st.int8_activations
        if i8 and (why := imported_form_problems(a["bits"], a["group_size"], **form)):
            # said in the compile log (Lowered.float_activations), never a silent change of kernel
            st.float_activations[st.weight_of.get(inputs["qweight"], inputs["qweight"])] = ", ".join(why)
            i8 = False
        spec = matmul_spec(k, n_out, n_in, a["bits"], a["group_size"], a["sym"], rows, i8,
                           arch=st.target.arch if st.target is not None else "x86_64", **form)
        weights = [st.arg(v) for name, v in inputs.items() if name not in ("perm", "bias")]
        if isinstance(spec, k.QGemvX16Spec):  # the runtime interleaves the artifact's weights when it loads
            weights = [("weight", x16_name(ref, a["bits"], a["in_features"]) if i == 0 else x16_name(ref))
                       for i, (_, ref) in enumerate(weights)]
        bias = inputs.get("bias")
        if "perm" in inputs:  # act-order: the columns of x gathered once per call, then a plain matmul
            gathered = f"{out}.xperm"
            st.types[gathered] = TensorType((rows, n_in), "float32")
            st.emit(k.GatherSpec(rows, n_in), [st.arg(ins[0], (rows, n_in)), st.arg(inputs["perm"]),
                                               ("buffer", gathered, (rows, n_in))], gathered)
            x = ("buffer", gathered, (rows, n_in))
    if x is None:
        x = st.arg(ins[0], (rows, x_shape[-1]))
    if bias is not None:
        partial = f"{out}.nobias"
        st.types[partial] = TensorType((rows, n_out), "float32")
        st.emit(spec, [x, *weights, ("buffer", partial, (rows, n_out))], partial)
        bias_spec = k.BiasAddSpec(rows, n_out, st.weight_dtype(bias, node))
        st.emit(bias_spec, [("buffer", partial, (rows, n_out)), st.arg(bias), st.define(out, shape=(rows, n_out))], out)
    else:
        st.emit(spec, [x, *weights, st.define(out, shape=(rows, n_out))], out)
