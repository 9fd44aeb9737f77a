"""Lowering of the online `hadamard` op (part of lower_to_kernels): one kernel per node, fused with the SwiGLU or
GeGLU (silu/gelu(gate) * up) or the RoPE that produces its input when that value has no other reader."""

from __future__ import annotations

from typing import Any

from bitsmith.codegen import families as k
from bitsmith.codegen.gpu.hadamard import SHARED_BYTES, shared_bytes
from bitsmith.compiler.ir import Node
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.errors import BitsmithError


def hadamard_prologues(st: Any) -> dict[int, int]:
    """hadamard node index -> index of the node fused into its kernel (a silu*up mul, or a rope) when that
    node's output is read by the hadamard alone; the fused nodes (and the mul's silu) join `st.fused`."""
    prologues: dict[int, int] = {}
    for index, node in enumerate(st.fn.nodes):
        if node.op != "hadamard":
            continue
        value = node.inputs[0]
        producer = st.producer.get(value)
        if producer is None or len(st.users.get(value, [])) != 1 or value in st.fn.outputs:
            continue
        source = st.fn.nodes[producer]
        gate = _gate_partner(st, source) if source.op == "mul" else None
        if (source.op == "rope" and len(st.shape(value)) == 3) or gate is not None:
            prologues[index] = producer
            st.fused.add(producer)
            if gate is not None:
                st.fused.add(gate)  # a gelu (a silu is fused with its mul already)
    return prologues


def _gate_partner(st: Any, mul: Node) -> int | None:
    """The silu or gelu whose output only this mul reads, of the mul's shape (SwiGLU / GeGLU): its index."""
    silu = st.silu_partner(mul)
    if silu is not None:
        return silu
    for value in mul.inputs:
        producer = st.producer.get(value)
        if (producer is not None and st.fn.nodes[producer].op == "gelu" and len(st.users.get(value, [])) == 1
                and st.shape(value) == st.shape(mul.outputs[0]) and value not in st.fn.outputs
                and len(set(mul.inputs)) == 2):
            return producer
    return None


def _gate_kind(node: Node) -> str:
    """HadamardSpec.gate of a silu or gelu node."""
    if node.op == "gelu":
        return "gelu_tanh" if node.attrs.get("approximate", "none") == "tanh" else "gelu"
    return node.op


def lower_hadamard(st: Any, index: int, node: Node) -> None:
    """Emit the node's kernel: RopeHadamardSpec, or HadamardSpec with gate silu/gelu/gelu_tanh, with its fused
    producer; else HadamardSpec over every row of the last axis."""
    ins, out = node.inputs, node.outputs[0]
    shape = st.shape(ins[0])
    n = shape[-1]
    factor_args = [st.arg(ins[1])] if len(ins) == 2 else []
    m, dtype = (st.shape(ins[1])[0], st.weight_dtype(ins[1], node)) if factor_args else (1, "float32")
    _check_gpu_row(st, node, n)
    producer = st.prologues.get(index)
    source = st.fn.nodes[producer] if producer is not None else None
    if source is not None and source.op == "rope":
        rows, heads, hd = shape
        a = source.attrs
        rot = a.get("rotary_dim", hd)
        spec = _spec(st, node, k.RopeHadamardSpec, rows, heads, hd, rot, a.get("style", "half"), m, dtype)
        table = st.constant("rope_inv_freq", rope_inv_freq(rot, a["theta"], a.get("scaling")))
        args = [st.arg(source.inputs[0]), st.arg(source.inputs[1]), table]
        st.emit(spec, args + factor_args + [st.define(out)], out)
        return
    rows = 1
    for d in shape[:-1]:
        rows *= d
    if source is not None:  # act(gate) * up
        act = st.fn.nodes[_gate_partner(st, source)]
        gate = act.inputs[0]
        up = next(v for v in source.inputs if v != act.outputs[0])
        spec = _spec(st, node, k.HadamardSpec, rows, n, m, dtype, _gate_kind(act))
        args = [st.arg(gate, (rows, n)), st.arg(up, (rows, n))]
    else:
        spec = _spec(st, node, k.HadamardSpec, rows, n, m, dtype)
        args = [st.arg(ins[0], (rows, n))]
    st.emit(spec, args + factor_args + [st.define(out, shape=(rows, n))], out)


def _spec(st: Any, node: Node, family: Any, *fields: Any) -> Any:
    """The kernel spec, its refusal (a size that is no power of two times the factor) naming the node."""
    try:
        return family(*fields)
    except BitsmithError as exc:
        raise st.unsupported(node, f"has no kernel: {exc.problem}") from exc


def _check_gpu_row(st: Any, node: Node, n: int) -> None:
    """A GPU kernel keeps a row in shared memory: refuse rows that do not fit (at lowering, not at build)."""
    if st.target is not None and st.target.is_gpu and shared_bytes(n) > SHARED_BYTES:
        raise BitsmithError(f"op hadamard ({node.outputs[0]}) transforms rows of {n} values: its GPU kernel needs "
                            f"{shared_bytes(n)} bytes of shared memory, more than {SHARED_BYTES}",
                            where=f"pass lower_to_kernels, {st.fn.name}",
                            fix="rotate rows of at most 6144 values online, or compile for a CPU target")
