"""The IR: typed SSA values, nodes, functions (prefill/decode) and a module sharing named weights."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

from bitsmith.errors import BitsmithError

IR_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "uint32", "uint8", "int8", "bool")

# A dimension is a concrete size or a symbolic name ("seq", "ctx", ...) bound at run time.
Dim = int | str


@dataclass(frozen=True)
class TensorType:
    shape: tuple[Dim, ...]
    dtype: str

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BitsmithError(f"unknown dtype {self.dtype!r}", fix=f"use one of {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"

    def to_json(self) -> dict[str, Any]:
        return {"shape": list(self.shape), "dtype": self.dtype}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "TensorType":
        return cls(tuple(data["shape"]), data["dtype"])


@dataclass(frozen=True)
class Node:
    """One op application. `outputs` are fresh SSA names; `attrs` are JSON-serialisable."""

    op: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.outputs[0]

    def to_json(self) -> dict[str, Any]:
        return {"op": self.op, "inputs": list(self.inputs), "outputs": list(self.outputs), "attrs": self.attrs}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Node":
        return cls(data["op"], tuple(data["inputs"]), tuple(data["outputs"]), dict(data.get("attrs", {})))


@dataclass(frozen=True)
class Function:
    """An entry point: named typed inputs, nodes in a valid order, named outputs."""

    name: str
    inputs: tuple[tuple[str, TensorType], ...]
    nodes: tuple[Node, ...]
    outputs: tuple[str, ...]
    types: dict[str, TensorType]  # every value (inputs and node outputs) -> its type

    def node_of(self, value: str) -> Node | None:
        for node in self.nodes:
            if value in node.outputs:
                return node
        return None

    def replace(self, **changes: Any) -> "Function":
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "inputs": [[n, t.to_json()] for n, t in self.inputs],
            "nodes": [n.to_json() for n in self.nodes],
            "outputs": list(self.outputs),
            "types": {k: v.to_json() for k, v in self.types.items()},
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Function":
        return cls(
            name=data["name"],
            inputs=tuple((n, TensorType.from_json(t)) for n, t in data["inputs"]),
            nodes=tuple(Node.from_json(n) for n in data["nodes"]),
            outputs=tuple(data["outputs"]),
            types={k: TensorType.from_json(v) for k, v in data["types"].items()},
        )


@dataclass(frozen=True)
class Module:
    """Entry functions (`prefill`, `decode`) sharing `weights` (name -> type), plus free-form metadata."""

    functions: dict[str, Function]
    weights: dict[str, TensorType]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise BitsmithError(f"module has no entry point {name!r}", fix=f"use one of {sorted(self.functions)}")

    def replace(self, **changes: Any) -> "Module":
        return dataclasses.replace(self, **changes)

    def with_weight_types(self, weights: dict[str, TensorType]) -> "Module":
        """New weight table; every `weight` node's recorded type follows it."""
        functions = {}
        for key, fn in self.functions.items():
            types = dict(fn.types)
            for node in fn.nodes:
                if node.op == "weight":
                    types[node.outputs[0]] = weights[node.attrs["name"]]
            functions[key] = fn.replace(types=types)
        return self.replace(functions=functions, weights=weights)

    def with_function(self, fn: Function) -> "Module":
        return self.replace(functions={**self.functions, fn.name: fn})

    def to_json(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "functions": {k: f.to_json() for k, f in self.functions.items()},
            "weights": {k: t.to_json() for k, t in self.weights.items()},
            "meta": self.meta,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Module":
        if data.get("ir_version") != IR_VERSION:
            raise BitsmithError(
                f"IR version {data.get('ir_version')!r} is not {IR_VERSION}", fix="recompile the model with this bitsmith"
            )
        return cls(
            functions={k: Function.from_json(f) for k, f in data["functions"].items()},
            weights={k: TensorType.from_json(t) for k, t in data["weights"].items()},
            meta=dict(data.get("meta", {})),
        )


def iter_values(fn: Function) -> Iterator[str]:
    yield from (name for name, _ in fn.inputs)
    for node in fn.nodes:
        yield from node.outputs
