"""Runs an artifact's compiled kernel schedules with the TVM runtime and numpy only (no torch, no compiler)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.arena import aligned_bytes, round_up, view
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.schedule import KernelPlan, Schedule

def kernel_plan(artifact: Artifact) -> KernelPlan | None:
    entry = artifact.manifest.get("kernels")
    return KernelPlan.from_json(entry) if entry else None


def _machine() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def runs_here(plan: KernelPlan) -> bool:
    return plan.arch == _machine()


def _check_runs_here(plan: KernelPlan, directory: Path) -> None:
    machine = _machine()
    if plan.arch != machine:
        raise BitsmithError(f"the kernels were built for {plan.target} ({plan.arch}), this machine is {machine}",
                            where=str(directory / plan.library),
                            fix="recompile on this machine with `--target host`, or use `--executor reference`")


def _tensor(array: np.ndarray) -> Any:
    """A zero-copy TVM tensor over a 64-byte aligned numpy array."""
    import tvm

    return tvm.runtime.from_dlpack(array)


class _Step:
    """One schedule bound to memory: every kernel call has its function and argument tensors ready."""

    def __init__(self, schedule: Schedule, library: Any, weights: dict[str, Any], cache_layers: list[Any],
                 constants: dict[str, Any]) -> None:
        self.schedule = schedule
        self.arena = aligned_bytes(schedule.arena_bytes)
        self.views = {name: view(self.arena, b.offset, b.shape, b.dtype) for name, b in schedule.buffers.items()}
        tensors: dict[tuple[str, tuple[int, ...]], Any] = {}  # (buffer, the call's shape) -> tensor
        self.calls = []
        for call in schedule.calls:
            try:
                func = library[call.kernel]
            except Exception as exc:  # TVM raises its own error type for a missing symbol
                raise BitsmithError(f"kernel {call.kernel} is missing from the kernel library",
                                    where=f"schedule {schedule.entry}", fix="recompile the artifact") from exc
            args = []
            for kind, ref, *shape in call.args:
                if kind == "buffer":
                    key = (ref, tuple(shape[0]))
                    if key not in tensors:
                        tensors[key] = _tensor(self.views[ref].reshape(key[1]))
                    args.append(tensors[key])
                else:
                    args.append(cache_layers[int(ref)] if kind == "cache" else (weights if kind == "weight" else constants)[ref])
            self.calls.append((func, args))
        self.tokens = self.views[schedule.inputs["tokens"]]
        self.positions = self.views[schedule.inputs["positions"]]
        self.logits = self.views[schedule.output]

    def run(self, tokens: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """Logits [len(tokens), vocab]; rows past len(tokens) are padding (position -1: no cache write)."""
        n = len(tokens)
        self.tokens[:n], self.tokens[n:] = tokens, 0
        self.positions[:n], self.positions[n:] = positions, -1
        for func, args in self.calls:
            func(*args)
        return self.logits.reshape(self.schedule.rows, -1)[:n].copy()


class CompiledSession:
    """One sequence's state (KV cache + position) run through the compiled prefill/decode schedules."""

    def __init__(self, artifact: Artifact, max_context: int | None = None) -> None:
        import tvm

        plan = kernel_plan(artifact)
        if plan is None:
            raise BitsmithError("the artifact has no compiled kernels", where=str(artifact.directory),
                                fix="recompile with `--target host`, or run with `--executor reference`")
        _check_runs_here(plan, artifact.directory)
        library = tvm.runtime.load_module(str(artifact.directory / plan.library))
        used = {ref for s in plan.schedules.values() for c in s.calls for kind, ref, *_ in c.args if kind == "weight"}
        self.weights_arena, weights = _load_weights(artifact, used)
        shape = tuple(plan.cache["shape"])
        self.kv_cache = view(aligned_bytes(4 * int(np.prod(shape)), huge_pages=True), 0, shape, plan.cache["dtype"])
        cache_layers = [_tensor(self.kv_cache[layer]) for layer in range(shape[0])]
        self._constants = {name: _aligned_copy(np.asarray(c["values"], dtype=c["dtype"]).reshape(c["shape"]))
                           for name, c in plan.constants.items()}
        constants = {name: _tensor(a) for name, a in self._constants.items()}
        self.steps = {entry: _Step(s, library, weights, cache_layers, constants) for entry, s in plan.schedules.items()}
        self.max_context = min(shape[2], max_context or shape[2])
        self.position = 0

    def reset(self) -> None:
        self.position = 0  # stale cache slots are never read: a step writes slots before it reads them

    def _advance(self, n: int) -> np.ndarray:
        if self.position + n > self.max_context:
            raise BitsmithError(f"{self.position + n} tokens exceed the context of {self.max_context}",
                                fix="shorten the prompt or lower --max-tokens (or recompile with a larger --context)")
        positions = np.arange(self.position, self.position + n, dtype=np.int64)
        self.position += n
        return positions

    def prefill(self, tokens: list[int]) -> np.ndarray:
        """Logits [len(tokens), vocab] for every prompt token, in chunks of the prefill schedule's rows."""
        step = self.steps["prefill"]
        positions = self._advance(len(tokens))
        ids = np.asarray(tokens, dtype=np.int64)
        rows = step.schedule.rows
        return np.concatenate([step.run(ids[i:i + rows], positions[i:i + rows]) for i in range(0, len(ids), rows)])

    def decode(self, token: int) -> np.ndarray:
        """Logits [vocab] for the next token after `token`."""
        positions = self._advance(1)
        return self.steps["decode"].run(np.array([token], dtype=np.int64), positions)[0]


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    out = view(aligned_bytes(array.nbytes), 0, array.shape, str(array.dtype))
    out[...] = array
    return out


def _load_weights(artifact: Artifact, names: set[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The kernels' weights copied once into one huge-page arena (64-byte aligned each) as TVM tensors."""
    source = {name: artifact.weights[name] for name in sorted(names)}
    offsets, total = {}, 0
    for name, array in source.items():
        offsets[name] = total
        total += round_up(array.nbytes)
    arena = aligned_bytes(total, huge_pages=True)
    tensors = {}
    for name, array in source.items():
        dst = view(arena, offsets[name], array.shape, str(array.dtype))
        dst[...] = array
        tensors[name] = _tensor(dst)
    return arena, tensors
