"""Mixture-of-experts tracing: a transformers experts implementation that is one torch custom op, and its lowering."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

from bitsmith.compiler.frontends.graph_lowering import Val
from bitsmith.errors import BitsmithError

IMPLEMENTATION = "bitsmith"  # the name under which transformers dispatches experts to `_experts_forward`
_registered = False


def _register() -> None:
    """Define `bitsmith::moe_experts` (eager: rows grouped by expert, as transformers' loop) and register it as an
    experts implementation. torch.export keeps a custom op as one node, where transformers' own loop over the
    experts hit by the batch is data-dependent control flow that cannot trace."""
    global _registered
    if _registered:
        return
    import torch  # heavy: torch
    from transformers.integrations.moe import ExpertsInterface  # heavy: torch

    schema = "(Tensor hidden, Tensor top_k_index, Tensor top_k_weights, Tensor gate_up, Tensor down) -> Tensor"

    @torch.library.custom_op("bitsmith::moe_experts", mutates_args=(), schema=schema)
    def moe_experts(hidden, top_k_index, top_k_weights, gate_up, down):
        # hidden [T, H], top_k_index/top_k_weights [T, k], gate_up [E, 2I, H], down [E, H, I]
        out = torch.zeros_like(hidden)
        for e in torch.unique(top_k_index).tolist():
            rows, slot = torch.nonzero(top_k_index == e, as_tuple=True)
            gate, up = torch.nn.functional.linear(hidden[rows], gate_up[e]).chunk(2, dim=-1)
            y = torch.nn.functional.linear(torch.nn.functional.silu(gate) * up, down[e])
            out.index_add_(0, rows, (y * top_k_weights[rows, slot, None]).to(out.dtype))
        return out

    @moe_experts.register_fake
    def _(hidden, top_k_index, top_k_weights, gate_up, down):
        return torch.empty_like(hidden)

    ExpertsInterface.register(IMPLEMENTATION, _experts_forward)
    _registered = True


def _experts_forward(self: Any, hidden_states: Any, top_k_index: Any, top_k_weights: Any) -> Any:
    import torch  # heavy: torch

    act = type(getattr(self, "act_fn", None)).__name__
    layout = (getattr(self, "has_gate", True), getattr(self, "has_bias", False), getattr(self, "is_transposed", False),
              getattr(self, "is_concatenated", True))
    if layout != (True, False, False, True) or act != "SiLUActivation":
        raise BitsmithError(f"{type(self).__name__}: experts with (gate, bias, transposed, concatenated) = {layout} "
                            f"and activation {act} are not supported", where="frontend torch_export (hf_moe)",
                            fix="bitsmith traces gated SiLU experts stored as gate_up_proj [E, 2I, H] and "
                                "down_proj [E, H, I] (Mixtral, Qwen3-MoE, OLMoE)")
    return torch.ops.bitsmith.moe_experts(hidden_states, top_k_index, top_k_weights.to(hidden_states.dtype),
                                          self.gate_up_proj, self.down_proj)


def has_stacked_experts(model: Any) -> bool:
    return any(getattr(m, "gate_up_proj", None) is not None and getattr(m.gate_up_proj, "ndim", 0) == 3
               for m in model.modules())


@contextlib.contextmanager
def traceable_experts(model: Any) -> Iterator[None]:
    """While tracing, the model's experts run as the `bitsmith::moe_experts` custom op (restored afterwards)."""
    if not (hasattr(model, "set_experts_implementation") and has_stacked_experts(model)):
        yield
        return
    _register()
    saved = model.get_experts_implementation()
    model.set_experts_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_experts_implementation(saved)


INPLACE = ("add_", "sub_", "mul_", "div_")
# ops whose result may share storage with their input: an in-place op on one also changes the base tensor
VIEWS = ("view", "reshape", "_unsafe_view", "slice", "select", "transpose", "permute", "expand", "unsqueeze",
         "squeeze", "flatten", "as_strided", "t", "alias", "diagonal", "unfold", "narrow", "split", "chunk",
         "split_with_sizes", "unbind")


def _packet_name(node: Any) -> str:
    packet = getattr(getattr(node, "target", None), "overloadpacket", None)
    return getattr(packet, "__name__", "") if getattr(node, "op", "") == "call_function" else ""


def inplace_as_values(graph: Any) -> None:
    """`x /= s` (aten.div_, as a non-strict export keeps it): later readers of x read the in-place op's result,
    so the op becomes an ordinary value (the routers' top-k renormalisation is written this way). Only for
    add_/sub_/mul_/div_ where x owns its storage (not a view, not a graph input); any other in-place op is
    refused here, live or not: the IR would otherwise silently read x as it was before the write."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node in list(graph.nodes):
        name = _packet_name(node)
        if not name.endswith("_") or name.startswith("_"):
            continue
        x = node.args[0]
        if name not in INPLACE or x.op != "call_function" or _packet_name(x) in VIEWS:
            trace = (node.meta.get("stack_trace") or "").strip().splitlines()
            raise BitsmithError(f"in-place aten.{name} on {'a view' if x.op == 'call_function' else 'an input'} "
                                "is not supported", where=trace[-1].strip() if trace else f"node {node.name}",
                                fix="write it out of place (y = x * s instead of x.mul_(s))")
        for user in list(x.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(x, node)
        node.meta["bitsmith_inplace_as_value"] = True


class MoeLowering:
    """ATen lowerings of the MoE block (mixed into the torch.export lowering): top-k, sum, the experts op.
    The pass fuse_router turns softmax -> topk -> (sum, div) into one `router` op."""

    def op_topk(self, node: Any) -> list[Val]:
        x, k = self.arg(node, 0, "self"), self.arg(node, 1, "k")
        dim, largest = self.arg(node, 2, "dim", -1), self.arg(node, 3, "largest", True)
        if self.axis(x, dim, node) != self.rank(x) - x.batched - 1 or not largest:
            raise BitsmithError(f"topk over dim {dim} (largest={largest}) is not supported", where=self.locate(node),
                                fix="only the largest k along the last axis (a MoE router) map to the IR")
        names = self.b.op_multi("topk", [x.name], hint=self.hint(node), k=int(k))
        return [Val(n, x.batched) for n in names]

    def op_sum(self, node: Any) -> Val:
        x, dims, keep = self.arg(node, 0, "self"), self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False)
        if dims is None or (node.kwargs.get("dtype") is not None):
            raise BitsmithError("sum over all axes (or with a dtype) is not supported", where=self.locate(node))
        axes = [self.axis(x, d, node) for d in dims]
        return self.emit(node, "sum", [x.name], x.batched, axes=axes, keepdim=bool(keep))

    def _inplace(self, node: Any, op: str) -> Val:
        """An in-place op that inplace_as_values turned into a value (it refused every other)."""
        if not node.meta.get("bitsmith_inplace_as_value"):
            raise BitsmithError(f"in-place {node.target} was not rewritten", where=self.locate(node),
                                fix="run inplace_as_values on the exported graph first")
        return self.binary(node, op)

    def op_div_(self, node: Any) -> Val:
        return self._inplace(node, "div")

    def op_mul_(self, node: Any) -> Val:
        return self._inplace(node, "mul")

    def op_add_(self, node: Any) -> Val:
        return self._inplace(node, "add")

    def op_sub_(self, node: Any) -> Val:
        return self._inplace(node, "sub")

    def op_moe_experts(self, node: Any) -> Val:
        x, idx, w, gate_up, down = (self.arg(node, i, n) for i, n in
                                    enumerate(("hidden", "top_k_index", "top_k_weights", "gate_up", "down")))
        if x.batched or idx.batched or w.batched:
            raise BitsmithError("MoE experts on a batched [1, seq, H] input", where=self.locate(node),
                                fix="the MoE block flattens tokens to [seq, H] before its experts")
        val = self.emit(node, "moe", [x.name, w.name, idx.name, gate_up.name, down.name], False, act="silu")
        merged = getattr(self, "merged", None)
        if merged is not None and x.name in merged:  # its output is reshaped back to [1, seq, H]
            merged.add(val.name)
        return val
