"""Helpers for rewrite passes: producer/consumer maps and a rewriter that re-emits a function node by node."""

from __future__ import annotations

import re
from typing import Any, Callable

import numpy as np

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.compiler.ops import infer_types
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass


def producers(fn: Function) -> dict[str, Node]:
    return {out: node for node in fn.nodes for out in node.outputs}


def consumers(fn: Function) -> dict[str, list[Node]]:
    users: dict[str, list[Node]] = {}
    for node in fn.nodes:
        for v in node.inputs:
            users.setdefault(v, []).append(node)
    return users


def const_value(node: Node | None) -> np.ndarray | None:
    """The value of a `const` node, else None."""
    if node is None or node.op != "const":
        return None
    is_float = node.attrs["dtype"] in ("float32", "float16", "bfloat16")
    return np.asarray(node.attrs["value"], dtype=np.float64 if is_float else None)


def is_scalar_const(node: Node | None, value: float, tol: float = 1e-6) -> bool:
    v = const_value(node)
    return v is not None and v.size == 1 and abs(float(v.reshape(-1)[0]) - value) <= tol * max(abs(value), 1e-12)


class FunctionRewriter:
    """Re-emits `fn`: `keep` copies a node, `emit` adds a new one, `replace` redirects later uses of a value.

    Value names of kept nodes are preserved; new nodes get fresh names from their hint.
    """

    def __init__(self, fn: Function, weights: dict[str, TensorType]):
        self.fn = fn
        self.weights = weights
        self.nodes: list[Node] = []
        self.types: dict[str, TensorType] = {n: t for n, t in fn.inputs}
        self.alias: dict[str, str] = {}
        self.new_producer: dict[str, Node] = {}
        self._taken = set(fn.types)
        self._counter = 0

    def get(self, value: str) -> str:
        while value in self.alias:
            value = self.alias[value]
        return value

    def producer(self, value: str) -> Node | None:
        """The node producing `value` in the rewritten function (after aliasing)."""
        return self.new_producer.get(self.get(value))

    def type_of(self, value: str) -> TensorType:
        return self.types[self.get(value)]

    def _fresh(self, hint: str) -> str:
        hint = re.sub(r"(\.r?\d+)+$", "", hint)  # no pile-up of counters across passes
        while True:
            self._counter += 1
            name = f"{hint}.r{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def _append(self, node: Node, out_types: list[TensorType]) -> None:
        self.nodes.append(node)
        for name, t in zip(node.outputs, out_types):
            self.types[name] = t
            self.new_producer[name] = node

    def keep(self, node: Node) -> None:
        inputs = tuple(self.get(v) for v in node.inputs)
        self._append(Node(node.op, inputs, node.outputs, node.attrs), [self.fn.types[o] for o in node.outputs])

    def emit_multi(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> list[str]:
        inputs = [self.get(v) for v in inputs]
        in_types = [self.types[v] for v in inputs]
        out_types = infer_types(op, in_types, attrs, self.weights, where=f"{self.fn.name}/{hint}")
        outs = tuple(self._fresh(hint) for _ in out_types)
        self._append(Node(op, tuple(inputs), outs, attrs), out_types)
        return list(outs)

    def emit(self, op: str, inputs: list[str], hint: str, **attrs: Any) -> str:
        return self.emit_multi(op, inputs, hint, **attrs)[0]

    def replace(self, value: str, new_value: str) -> None:
        """Later uses of `value` read `new_value`, which must have the same type."""
        old, new = self.fn.types[value], self.type_of(new_value)
        if old != new:
            raise BitsmithError(f"rewrite changed the type of {value} from {old} to {new}",
                                where=f"{self.fn.name}/{value}", fix="this is a bug in the rewrite pass")
        if self.get(new_value) != value:
            self.alias[value] = self.get(new_value)

    def finish(self) -> Function:
        outputs = tuple(self.get(v) for v in self.fn.outputs)
        return Function(self.fn.name, self.fn.inputs, tuple(self.nodes), outputs, dict(self.types))


def map_functions(module: Module, rewrite: Callable[[Function, Module], Function]) -> Module:
    """Apply a per-function rewrite to every entry point; returns a new module."""
    return module.replace(functions={name: rewrite(fn, module) for name, fn in module.functions.items()})


class TracedRewrite(Pass):
    """A canonicalizing rewrite of a traced module (prefill alone), then dead-code elimination of the nodes it
    left unread. Weights stay: eliminate_dead_code drops those no function reads once decode is derived."""

    requires = frozenset({"traced"})

    def rewrite(self, module: Module) -> Module:
        raise NotImplementedError

    def run(self, module: Module, ctx: PassContext) -> Module:
        module = self.rewrite(module)
        return module.replace(functions={k: dead_code_elimination(f) for k, f in module.functions.items()})
