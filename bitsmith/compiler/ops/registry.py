"""The op registry: each op's arity, type inference over symbolic dims and numpy reference."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from bitsmith.compiler.ir import Dim, TensorType
from bitsmith.errors import BitsmithError

FLOAT = ("float32", "float16", "bfloat16")
COMPUTE_DTYPE = "float32"  # activations are float32; weights may be stored narrower and are upcast on use


@dataclass
class RefContext:
    """What reference kernels may read besides their inputs: weights and the bound symbolic dims."""

    weights: Any  # Mapping[str, np.ndarray]
    dims: dict[str, int]
    # "int8": qlinear rounds its input as the int8-activation kernels do (ops/quant.py round_int8_activations);
    # "float32": exact (the default)
    activations: str = "float32"


InferFn = Callable[[list[TensorType], dict[str, Any], dict[str, TensorType]], list[TensorType]]
RefFn = Callable[[list[np.ndarray], dict[str, Any], RefContext], list[np.ndarray]]


@dataclass(frozen=True)
class OpDef:
    name: str
    arity: tuple[int, int]  # (min, max) number of inputs
    infer: InferFn
    ref: RefFn


OPS: dict[str, OpDef] = {}


def register(name: str, arity: tuple[int, int], infer: InferFn, ref: RefFn) -> None:
    OPS[name] = OpDef(name, arity, infer, ref)


class ShapeError(Exception):
    """Raised inside inference; `infer_types` turns it into a BitsmithError naming the node."""


def infer_types(op: str, in_types: list[TensorType], attrs: dict[str, Any], weights: dict[str, TensorType],
                where: str) -> list[TensorType]:
    if op not in OPS:
        raise BitsmithError(f"unknown op {op!r}", where=where, fix=f"use one of {sorted(OPS)}")
    lo, hi = OPS[op].arity
    if not lo <= len(in_types) <= hi:
        raise BitsmithError(f"op {op} takes {lo}..{hi} inputs, got {len(in_types)}", where=where)
    try:
        return OPS[op].infer(in_types, attrs, weights)
    except ShapeError as exc:
        raise BitsmithError(f"{op}: {exc}", where=where, fix="check the shapes feeding this node") from exc


# ---------------------------------------------------------------- shape helpers


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ShapeError(msg)


def broadcast_dims(a: tuple[Dim, ...], b: tuple[Dim, ...]) -> tuple[Dim, ...]:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        da = a[len(a) - 1 - i] if i < len(a) else 1
        db = b[len(b) - 1 - i] if i < len(b) else 1
        check(da == db or da == 1 or db == 1, f"cannot broadcast {a} with {b}")
        out.append(db if da == 1 else da)
    return tuple(reversed(out))


def _factor(shape: tuple[Dim, ...]) -> tuple[int, list[str]]:
    """A product of dims as (integer part, sorted symbols)."""
    const, syms = 1, []
    for d in shape:
        if isinstance(d, str):
            syms.append(d)
        else:
            const *= d
    return const, sorted(syms)


def reshape_dims(src: tuple[Dim, ...], target: tuple[Dim, ...]) -> tuple[Dim, ...]:
    """Resolve one -1 in `target` symbolically; the element counts must match."""
    s_const, s_syms = _factor(src)
    known = tuple(d for d in target if d != -1)
    t_const, t_syms = _factor(known)
    n_infer = len(target) - len(known)
    check(n_infer <= 1, f"reshape target {target} has more than one -1")
    rest = list(s_syms)
    for s in t_syms:
        check(s in rest, f"cannot reshape {src} to {target}: symbol {s} not in source")
        rest.remove(s)
    check(t_const != 0 and s_const % t_const == 0, f"cannot reshape {src} to {target}")
    left = s_const // t_const
    if n_infer == 0:
        check(left == 1 and not rest, f"cannot reshape {src} to {target}: element counts differ")
        return tuple(target)
    check(len(rest) <= 1 and (not rest or left == 1), f"cannot infer -1 reshaping {src} to {target}")
    fill: Dim = rest[0] if rest else left
    return tuple(fill if d == -1 else d for d in target)


def axis_index(axis: int, rank: int) -> int:
    check(-rank <= axis < rank, f"axis {axis} out of range for rank {rank}")
    return axis % rank


def bind(shape: tuple[Dim, ...] | list[Dim], dims: dict[str, int]) -> tuple[int, ...]:
    return tuple(dims[d] if isinstance(d, str) else d for d in shape)


def as_float(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.float32 else x.astype(np.float32)
