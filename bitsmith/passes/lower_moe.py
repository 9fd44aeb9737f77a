"""Lowering of the MoE ops for lower_to_kernels: `router` -> RouterSpec, `moe` / `qmoe` -> MoeSpec."""

from __future__ import annotations

from typing import Any

from bitsmith.codegen.moe import MoeSpec, RouterSpec
from bitsmith.codegen.spec_checks import DENSE_DTYPE_BITS
from bitsmith.compiler.ir import Node

MOE_OPS = ("router", "moe", "qmoe")


def lower_moe(st: Any, node: Node) -> None:
    """Emit the kernel of a MoE node into the lowering state `st` (lower_to_kernels._Lowering)."""
    ins, a = node.inputs, node.attrs
    if node.op == "router":
        rows, experts = st.shape(ins[0])
        spec = RouterSpec(rows, experts, a["top_k"], a["scoring"], bool(a.get("normalize", False)))
        weights, chosen = node.outputs
        st.emit(spec, [st.arg(ins[0]), st.define(weights), st.define(chosen, "int64")], weights)
        return
    rows, hidden = st.shape(ins[0])
    top_k = st.shape(ins[1])[1]
    if node.op == "moe":
        dtype = st.weight_dtype(ins[3], node)
        if dtype not in DENSE_DTYPE_BITS:
            raise st.unsupported(node, f"has {dtype} expert weights; the MoE kernel reads {', '.join(DENSE_DTYPE_BITS)}")
        experts, two_inter, _ = st.fn.types[ins[3]].shape
        spec = MoeSpec(rows, experts, top_k, hidden, two_inter // 2, DENSE_DTYPE_BITS[dtype], dense_dtype=dtype)
    else:
        forms = [f for f, on in (("the min form", a.get("offset")), ("two-level scales", a.get("super_group")),
                                 ("act-order", a.get("has_perm"))) if on]
        if forms:  # imported (GGUF / GPTQ) expert codes: the MoE kernel reads the plain forms only
            raise st.unsupported(node, f"has expert weights in {', '.join(forms)}, which the MoE kernel does not "
                                       "read; compile with --requantize (and a --scheme for the experts)")
        spec = MoeSpec(rows, a["experts"], top_k, hidden, a["inter"], a["bits"], a["group_size"], a["sym"])
    weights = [st.arg(v) for v in ins[3:]]
    st.emit(spec, [st.arg(ins[0]), st.arg(ins[1]), st.arg(ins[2]), *weights, st.define(node.outputs[0])],
            node.outputs[0])
