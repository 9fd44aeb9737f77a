"""The numpy reference executor: runs an IR entry point op by op; the oracle for every kernel."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from bitsmith.compiler.ir import Function, Module
from bitsmith.compiler.ops import OPS, RefContext, bind
from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import StoredTensor

ACTIVATIONS = ("float32", "int8")  # what qlinear inputs the reference computes with (run_function)


def upcast_weights(weights: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 copies of float weights (once, so no step pays the conversion); file-backed ones are read."""
    out = {}
    for name, value in weights.items():
        value = value.read() if isinstance(value, StoredTensor) else value
        out[name] = value.astype(np.float32) if value.dtype.kind in "fV" and value.dtype != np.float32 else value
    return out


def bind_dims(fn: Function, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bind each symbolic dim of the entry point's inputs to the size it has in `inputs`."""
    dims: dict[str, int] = {}
    for name, ttype in fn.inputs:
        if name not in inputs:
            raise BitsmithError(f"missing input {name!r}", where=f"function {fn.name}")
        shape = np.shape(inputs[name])
        if len(shape) != ttype.rank:
            raise BitsmithError(f"input {name!r} has rank {len(shape)}, expected {ttype}", where=f"function {fn.name}")
        for declared, actual in zip(ttype.shape, shape):
            if isinstance(declared, str):
                if dims.setdefault(declared, actual) != actual:
                    raise BitsmithError(f"dim {declared!r} bound to {dims[declared]} and {actual}", where=f"input {name}")
            elif declared != actual:
                raise BitsmithError(f"input {name!r} has shape {shape}, expected {ttype}", where=f"function {fn.name}")
    return dims


def check_activations(activations: str) -> str:
    """`activations` if it is one of ACTIVATIONS, else a BitsmithError naming them."""
    if activations not in ACTIVATIONS:
        raise BitsmithError(f"unknown activations {activations!r}", where="reference executor",
                            fix=f"use one of {', '.join(ACTIVATIONS)}")
    return activations


def run_function(fn: Function, weights: Mapping[str, np.ndarray], inputs: Mapping[str, np.ndarray],
                 activations: str = "float32") -> list[np.ndarray]:
    """Execute `fn` with numpy; frees each value after its last use. activations "int8": every qlinear the
    int8-activation kernels would run rounds its input as they do (ops/quant.py round_int8_activations)."""
    ctx = RefContext(weights, bind_dims(fn, inputs), check_activations(activations))
    last_use: dict[str, int] = {}
    for i, node in enumerate(fn.nodes):
        for v in node.inputs:
            last_use[v] = i
    env: dict[str, np.ndarray] = {name: inputs[name] for name, _ in fn.inputs}
    keep = set(fn.outputs)
    for i, node in enumerate(fn.nodes):
        args = [env[v] for v in node.inputs]
        try:
            results = OPS[node.op].ref(args, node.attrs, ctx)
        except (ValueError, IndexError, KeyError) as exc:
            raise BitsmithError(f"{node.op} failed: {exc}", where=f"{fn.name}/{node.name}") from exc
        for name, value in zip(node.outputs, results):
            expected = bind(fn.types[name].shape, ctx.dims)
            if value.shape != expected:
                raise BitsmithError(f"{node.op} produced shape {value.shape}, IR says {expected}",
                                    where=f"{fn.name}/{node.name}", fix="this is a bug in the op's reference")
            env[name] = value
        for v in node.inputs:
            if last_use.get(v) == i and v not in keep:
                env.pop(v, None)
    return [env[name] for name in fn.outputs]


class ReferenceSession:
    """One sequence's state (KV cache + position) driven through `prefill` and `decode` by the reference."""

    def __init__(self, module: Module, weights: Mapping[str, np.ndarray], max_context: int,
                 activations: str = "float32"):
        self.module = module
        self.activations = check_activations(activations)  # "int8": emulate the int8-activation kernels
        self.weights = upcast_weights(weights)
        cache_type = module["prefill"].inputs[2][1]
        self.max_context = max_context
        self.kv_cache = np.zeros(bind(cache_type.shape, {"ctx": max_context}), dtype=np.float32)
        self.position = 0

    def reset(self) -> None:
        self.kv_cache[:] = 0
        self.position = 0

    def _step(self, entry: str, tokens: list[int]) -> np.ndarray:
        n = len(tokens)
        if self.position + n > self.max_context:
            raise BitsmithError(
                f"{self.position + n} tokens exceed the context of {self.max_context}",
                fix="shorten the prompt or lower --max-tokens",
            )
        positions = np.arange(self.position, self.position + n, dtype=np.int64)
        logits, self.kv_cache = run_function(
            self.module[entry], self.weights,
            {"tokens": np.asarray(tokens, dtype=np.int64), "positions": positions, "kv_cache": self.kv_cache},
            self.activations,
        )
        self.position += n
        return logits

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] for every prompt token."""
        return self._step("prefill", tokens)

    def prefill_last(self, tokens: list[int]) -> np.ndarray:
        """Logits [vocab] after the last prompt token (what generation samples from)."""
        return self.prefill(tokens)[-1]

    def decode(self, token: int) -> np.ndarray:
        """Logits [vocab] for the next token after `token`."""
        return self._step("decode", [token])[0]
