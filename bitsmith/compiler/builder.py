"""Builds a Function node by node, each output type inferred from the op registry."""

from __future__ import annotations

from typing import Any

from bitsmith.compiler.ir import Function, Node, TensorType
from bitsmith.compiler.ops import infer_types
from bitsmith.errors import BitsmithError


class FunctionBuilder:
    """Appends nodes with fresh SSA names, inferring each output type from the op definition."""

    def __init__(self, name: str, weights: dict[str, TensorType]):
        self.name = name
        self.weights = weights
        self._inputs: list[tuple[str, TensorType]] = []
        self._nodes: list[Node] = []
        self._types: dict[str, TensorType] = {}
        self._weight_values: dict[str, str] = {}
        self._counter = 0

    def _fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}.{self._counter}" if hint else f"v{self._counter}"

    def input(self, name: str, ttype: TensorType) -> str:
        if name in self._types:
            raise BitsmithError(f"duplicate input {name!r}", where=f"function {self.name}")
        self._inputs.append((name, ttype))
        self._types[name] = ttype
        return name

    def weight(self, name: str) -> str:
        """A value holding the named module weight (one `weight` node per name and function)."""
        if name not in self._weight_values:
            self._weight_values[name] = self.op("weight", [], name=name, hint=name)
        return self._weight_values[name]

    def op(self, op: str, inputs: list[str], hint: str = "", **attrs: Any) -> str:
        return self.op_multi(op, inputs, hint=hint, **attrs)[0]

    def op_multi(self, op: str, inputs: list[str], hint: str = "", **attrs: Any) -> list[str]:
        in_types = [self._types[i] for i in inputs]
        out_types = infer_types(op, in_types, attrs, self.weights, where=f"{self.name}/{hint or op}")
        outs = [self._fresh(hint or op) for _ in out_types]
        self._nodes.append(Node(op, tuple(inputs), tuple(outs), attrs))
        for name, t in zip(outs, out_types):
            self._types[name] = t
        return outs

    def type_of(self, value: str) -> TensorType:
        return self._types[value]

    def finish(self, outputs: list[str]) -> Function:
        return Function(self.name, tuple(self._inputs), tuple(self._nodes), tuple(outputs), dict(self._types))
