"""ATen shape plumbing for the torch.export lowering: reshapes (with the batch of 1 merged into the tokens and split
off again around Conv1D matmuls), mm/addmm on transposed weights, expand, transpose/permute, slice, cat, split."""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from bitsmith.compiler.frontends.graph_lowering import SEQ, Val, weight_name
from bitsmith.errors import BitsmithError


def source_line(node: Any) -> str:
    """The innermost frame of the traced code outside torch itself, e.g. `modeling_x.py:12 (y = f(x))`."""
    frames = re.findall(r'File "([^"]+)", line (\d+), in \S+\n\s*(.*)', node.meta.get("stack_trace") or "")
    own = [f for f in frames if "/torch/" not in f[0]] or frames
    if own:
        path, line, code = own[-1]
        return f"{path}:{line} ({code.strip()})"
    stack = node.meta.get("nn_module_stack") or {}
    return f"module {list(stack.values())[-1][0]}" if stack else f"node {node.name}"


def packet(node: Any) -> str:
    """The ATen op name of a call node (`linear` for aten.linear.default), else ""."""
    packet = getattr(getattr(node, "target", None), "overloadpacket", None)
    return packet.__name__ if getattr(node, "op", "") == "call_function" and packet is not None else ""


class LayoutLowering:
    """Mixin of `_AtenLowering` (torch_export.py): the handlers of layout ops and of matmuls on weights."""

    def reshape(self, node: Any, x: Val) -> Val:
        """A reshape; Conv1D-style code flattens [1, seq, n] to [seq, n] around a matmul and back, which merges
        the batch of 1 into the tokens (`merged`) and then splits it off again."""
        out = list(node.meta["val"].shape)
        leading = out[0] if isinstance(out[0], int) else out[0].node.expr
        if x.batched and leading != 1:  # [1, seq, ...] -> [seq, ...]: no batch dim any more
            val = self.emit(node, "reshape", [x.name], False, shape=self.dims(node, False))
            self.merged.add(val.name)
            return val
        if not x.batched and x.name in self.merged and leading == 1:  # [seq, ...] -> [1, seq, ...]
            return self.emit(node, "reshape", [x.name], True, shape=self.dims(node, True))
        return self.emit(node, "reshape", [x.name], x.batched, shape=self.dims(node, x.batched))

    def transposed_weights(self) -> None:
        """Weights that are only ever the right operand of mm/addmm (GPT-2's Conv1D stores [in, out]) are stored
        transposed, [out, in], so those matmuls become ordinary `linear` ops that quantize and pack."""
        uses: dict[Any, set] = {}
        for node in self.nodes:
            for i, a in enumerate(node.args):
                if getattr(a, "op", None) == "placeholder" and a.name in self.state:
                    uses.setdefault(a, set()).add((packet(node), i))
        for node, how in uses.items():
            name = weight_name(self.state[node.name])
            if name in self.weights and how in ({("addmm", 2)}, {("mm", 1)}) and self.weights[name].ndim == 2:
                self.weights[name] = np.ascontiguousarray(self.weights[name].T)
                self.right_operands.add(node)

    def op_addmm(self, node: Any) -> Val:
        bias, x = self.arg(node, 0, "self"), self.arg(node, 1, "mat1")
        w = node.args[2 if packet(node) == "addmm" else 1]
        if w not in self.right_operands or node.kwargs.get("beta", 1) != 1 or node.kwargs.get("alpha", 1) != 1:
            raise BitsmithError(f"{node.target} of activations (or with beta/alpha) is not supported",
                                where=source_line(node), fix="use nn.Linear, or a weight as the right operand")
        val = self.emit(node, "linear", [x.name, self.v[w].name] + ([bias.name] if bias is not None else []),
                        x.batched)
        if x.name in self.merged:
            self.merged.add(val.name)
        return val

    def op_mm(self, node: Any) -> Val:
        x, w = self.arg(node, 0, "self"), node.args[1]
        if w not in self.right_operands:
            return self.binary(node, "matmul")
        val = self.emit(node, "linear", [x.name, self.v[w].name], x.batched)
        if x.name in self.merged:
            self.merged.add(val.name)
        return val

    def op_expand(self, node: Any) -> Val:
        x = self.arg(node, 0, "self")
        return self.emit(node, "broadcast_to", [x.name], x.batched, shape=self.dims(node, x.batched))

    def op_transpose(self, node: Any) -> Val:
        x = self.arg(node, 0, "self")
        perm = list(range(self.rank(x) - x.batched))
        a, b = (self.axis(x, d, node) for d in node.args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
        return self.emit(node, "transpose", [x.name], x.batched, perm=perm)

    def op_permute(self, node: Any) -> Val:
        x = self.arg(node, 0, "self")
        perm = [self.axis(x, d, node) for d in node.args[1]]
        return self.emit(node, "transpose", [x.name], x.batched, perm=perm)

    def _slice(self, node: Any, x: Val, dim: int, start: int, end: int, step: int = 1) -> Val:
        axis = self.axis(x, dim, node)
        size = self.b.type_of(x.name).shape[axis]
        if not isinstance(size, int) or not all(isinstance(v, int) for v in (start, end, step)):
            if (start or 0) == 0 and step == 1 and (end is None or end >= 1 << 62 or size == SEQ):
                return x  # x[:, :] along the token axis
            raise BitsmithError("slicing along the token dimension is not supported", where=source_line(node))
        return self.emit(node, "slice", [x.name], x.batched, axis=axis, start=start, end=min(end, size), step=step)

    def op_slice(self, node: Any) -> Val:
        x = self.arg(node, 0, "self")
        start, end = self.arg(node, 2, "start"), self.arg(node, 3, "end")
        return self._slice(node, x, self.arg(node, 1, "dim", 0), start or 0,
                           (1 << 62) if end is None else end, self.arg(node, 4, "step", 1))

    def op_cat(self, node: Any) -> Val:
        xs = self.arg(node, 0, "tensors")
        names, batched = self.aligned(xs)
        ref = next(x for x in xs if x.batched == batched)
        return self.emit(node, "concat", names, batched, axis=self.axis(ref, self.arg(node, 1, "dim", 0), node))

    def op_split_with_sizes(self, node: Any) -> list[Val]:
        """chunk / split / split_with_sizes -> slices along one axis (getitem picks them)."""
        x, n, dim = self.arg(node, 0, "self"), self.arg(node, 1, "split_size"), self.arg(node, 2, "dim", 0)
        total = self.b.type_of(x.name).shape[self.axis(x, dim, node)]
        if packet(node) == "chunk":
            n = -(-total // n)
        sizes = list(n) if isinstance(n, (list, tuple)) else [min(n, total - i) for i in range(0, total, n)]
        starts = np.cumsum([0] + sizes[:-1])
        return [self._slice(node, x, dim, int(a), int(a + k)) for a, k in zip(starts, sizes)]

    op_split = op_chunk = op_split_with_sizes
