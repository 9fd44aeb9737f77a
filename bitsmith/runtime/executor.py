"""Runs an artifact's compiled kernel schedules with the TVM runtime and numpy only (no torch, no compiler)."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any, Callable

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.arena import aligned_bytes, round_up, view
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.interleave import kernel_weight
from bitsmith.runtime.schedule import KernelPlan, Schedule

def kernel_plan(artifact: Artifact) -> KernelPlan | None:
    entry = artifact.manifest.get("kernels")
    return KernelPlan.from_json(entry) if entry else None


def _machine() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def runs_here(plan: KernelPlan) -> bool:
    if plan.arch == "cuda":
        from bitsmith.runtime.cuda_runner import cuda_device_present

        return cuda_device_present()
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


def bind_calls(schedule: Schedule, library: Any, buffer_tensor: Callable[[str, tuple[int, ...]], Any],
               bound: dict[str, Any]) -> list[tuple[Any, list[Any]]]:
    """Every call of `schedule` as (kernel function, argument tensors): buffers through
    `buffer_tensor(name, the call's shape)`, the rest from `bound[kind][ref]`."""
    calls = []
    for call in schedule.calls:
        try:
            func = library[call.kernel]
        except Exception as exc:  # TVM raises its own error type for a missing symbol
            raise BitsmithError(f"kernel {call.kernel} is missing from the kernel library",
                                where=f"schedule {schedule.entry}", fix="recompile the artifact") from exc
        args = [buffer_tensor(ref, tuple(shape[0])) if kind == "buffer" else bound[kind][ref]
                for kind, ref, *shape in call.args]
        calls.append((func, args))
    return calls


class _Step:
    """One schedule bound to memory: every kernel call has its function and argument tensors ready."""

    def __init__(self, schedule: Schedule, library: Any, bound: dict[str, Any]) -> None:
        self.schedule = schedule
        self.arena = aligned_bytes(schedule.arena_bytes)
        self.views = {name: view(self.arena, b.offset, b.shape, b.dtype) for name, b in schedule.buffers.items()}
        tensors: dict[tuple[str, tuple[int, ...]], Any] = {}  # (buffer, the call's shape) -> tensor

        def buffer_tensor(name: str, shape: tuple[int, ...]) -> Any:
            if (name, shape) not in tensors:
                tensors[name, shape] = _tensor(self.views[name].reshape(shape))
            return tensors[name, shape]

        self.calls = bind_calls(schedule, library, buffer_tensor, bound)
        self.tokens = self.views[schedule.inputs["tokens"]]
        self.positions = self.views[schedule.inputs["positions"]]
        self.block_tables = self.views[schedule.inputs["block_tables"]]
        self.logits = self.views[schedule.output].reshape(schedule.rows, -1)
        self.hidden = self.views[schedule.hidden].reshape(schedule.rows, -1) if schedule.hidden else None

    def run_trunk(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray) -> None:
        """Every call before the lm_head for n = len(tokens) rows; the rest are padding (position -1: no
        cache write). Without a head split this is the whole step."""
        n = len(tokens)
        self.tokens[:n], self.tokens[n:] = tokens, 0
        self.positions[:n], self.positions[n:] = positions, -1
        self.block_tables[:n] = block_tables
        for func, args in self.calls[:self.schedule.head_from]:
            func(*args)

    def run_head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [k, vocab] of k hidden-state rows (k <= rows) through the lm_head calls."""
        k = len(hidden)
        self.hidden[:k] = hidden
        for func, args in self.calls[self.schedule.head_from:]:
            func(*args)
        return self.logits[:k].copy()


def used_weights(plan: KernelPlan) -> list[str]:
    """Names of the weights some kernel call of the plan reads."""
    return sorted({ref for s in plan.schedules.values() for c in s.calls for kind, ref, *_ in c.args if kind == "weight"})


def constant_arrays(plan: KernelPlan) -> dict[str, np.ndarray]:
    """The plan's constant tables (rope frequencies) as arrays."""
    return {name: np.asarray(c["values"], dtype=c["dtype"]).reshape(c["shape"]) for name, c in plan.constants.items()}


def pool_shape(kv: dict[str, Any]) -> tuple[int, int, int, int, int]:
    """One layer's block pool: [num_blocks, 2 (keys, values), block_size, kv_heads, head_dim]; int8
    layers add fp32 scales of shape pool_shape[:4]."""
    return int(kv["num_blocks"]), 2, int(kv["block_size"]), int(kv["kv_heads"]), int(kv["head_dim"])


class StepRunner:
    """What every kernel runner shares: its steps (one per schedule, fewest rows first), the paged KV
    geometry, and the choice of the smallest step that holds n rows."""

    def _set_steps(self, plan: KernelPlan, steps: list[Any]) -> None:
        self.kv = plan.kv
        self.steps = sorted(steps, key=lambda st: st.schedule.rows)
        self.max_rows = self.steps[-1].schedule.rows
        self.block_size, self.num_blocks = int(plan.kv["block_size"]), int(plan.kv["num_blocks"])
        self.max_blocks, self.max_context = int(plan.kv["max_blocks"]), int(plan.kv["max_context"])

    @property
    def step_rows(self) -> tuple[int, ...]:
        """The row counts of the steps (a call of n rows pays for the smallest that holds n)."""
        return tuple(s.schedule.rows for s in self.steps)

    def _step_for(self, n: int) -> Any:
        if n > self.max_rows:
            raise BitsmithError(f"{n} rows exceed the largest schedule ({self.max_rows})",
                                where="kernel runner", fix="split the batch")
        return next(s for s in self.steps if s.schedule.rows >= n)


class KernelRunner(StepRunner):
    """An artifact's kernels, weights and paged KV pools in memory; runs batches of rows.

    A row is one token of one sequence: (token id, position, that sequence's block table). Rows of
    one call may belong to different sequences; the smallest schedule with enough rows runs them.
    """

    def __init__(self, artifact: Artifact) -> None:
        import tvm

        plan = kernel_plan(artifact)
        if plan is None:
            raise BitsmithError("the artifact has no compiled kernels", where=str(artifact.directory),
                                fix="recompile with `--target host`, or run with `--executor reference`")
        _check_runs_here(plan, artifact.directory)
        library = tvm.runtime.load_module(str(artifact.directory / plan.library))
        self.weights_arena, weights = _load_weights(artifact, used_weights(plan))
        self.pools, self.scales = _allocate_pools(plan.kv)
        self._constants = {name: _aligned_copy(a) for name, a in constant_arrays(plan).items()}
        bound = {"weight": weights, "const": {n: _tensor(a) for n, a in self._constants.items()},
                 "cache": {layer: _tensor(p) for layer, p in enumerate(self.pools)},
                 "kv_scales": {layer: _tensor(s) for layer, s in enumerate(self.scales) if s is not None}}
        self._set_steps(plan, [_Step(s, library, bound) for s in plan.schedules.values()])

    def run(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
            logits_rows: np.ndarray | list[int] | None = None) -> np.ndarray:
        """Logits [n, vocab], or [len(logits_rows), vocab] for just those rows (the ones that will be
        sampled: the lm_head then runs on them alone); block_tables int32 [n, max_blocks]."""
        n = len(tokens)
        step = self._step_for(n)
        step.run_trunk(tokens, positions, block_tables)
        if step.hidden is None:  # no head split: the trunk computed every row's logits
            rows = slice(None) if logits_rows is None else np.asarray(logits_rows, dtype=np.int64)
            return step.logits[:n][rows].copy()
        hidden = step.hidden[:n] if logits_rows is None else step.hidden[np.asarray(logits_rows, dtype=np.int64)]
        if len(hidden) == 0:
            return np.empty((0, step.logits.shape[1]), dtype=np.float32)
        return self._step_for(len(hidden)).run_head(hidden)


def open_runner(artifact: Artifact) -> Any:
    """The artifact's kernel runner: KernelRunner for CPU kernels, CudaKernelRunner for CUDA ones."""
    plan = kernel_plan(artifact)
    if plan is not None and plan.arch == "cuda":
        from bitsmith.runtime.cuda_runner import CudaKernelRunner

        return CudaKernelRunner(artifact)
    return KernelRunner(artifact)


class CompiledSession:
    """One sequence's state (position + a private block table) on the compiled kernels."""

    def __init__(self, artifact: Artifact, max_context: int | None = None, runner: KernelRunner | None = None) -> None:
        self.runner = runner or open_runner(artifact)
        self.max_context = min(self.runner.max_context, max_context or self.runner.max_context)
        if self.runner.num_blocks < self.runner.max_blocks:
            raise BitsmithError("the KV pool is smaller than one full-context sequence", where=str(artifact.directory),
                                fix="recompile with a larger --memory or a smaller --context")
        self.block_table = np.arange(self.runner.max_blocks, dtype=np.int32)  # identity: blocks 0..max_blocks-1
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
        """Logits [len(tokens), vocab] for every prompt token, in chunks of the largest schedule's rows."""
        return np.concatenate(self._prefill_chunks(tokens, last_only=False))

    def prefill_last(self, tokens: list[int]) -> np.ndarray:
        """Logits [vocab] after the last prompt token: the lm_head runs for that row alone."""
        return self._prefill_chunks(tokens, last_only=True)[-1][0]

    def _prefill_chunks(self, tokens: list[int], last_only: bool) -> list[np.ndarray]:
        """Each chunk's logits: all its rows, or (last_only) none but the prompt's last row."""
        positions = self._advance(len(tokens))
        ids = np.asarray(tokens, dtype=np.int64)
        rows, out = self.runner.max_rows, []
        for i in range(0, len(ids), rows):
            chunk = ids[i:i + rows]
            wanted = None if not last_only else [len(chunk) - 1] if i + rows >= len(ids) else []
            out.append(self._run(chunk, positions[i:i + rows], wanted))
        return out

    def decode(self, token: int) -> np.ndarray:
        """Logits [vocab] for the next token after `token`."""
        return self._run(np.array([token], dtype=np.int64), self._advance(1))[0]

    def _run(self, ids: np.ndarray, positions: np.ndarray, logits_rows: list[int] | None = None) -> np.ndarray:
        tables = np.broadcast_to(self.block_table, (len(ids), len(self.block_table)))
        return self.runner.run(ids, positions, tables, logits_rows=logits_rows)


def _allocate_pools(kv: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Per layer: the block pool [num_blocks, 2, block_size, kv_heads, head_dim] of the layer's KV dtype
    and, for int8 layers, fp32 scales [num_blocks, 2, block_size, kv_heads]."""
    shape = pool_shape(kv)
    pools, scales = [], []
    for dtype in kv["layer_dtypes"]:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pools.append(view(aligned_bytes(nbytes, huge_pages=nbytes >= (8 << 20)), 0, shape, dtype))
        scales.append(view(aligned_bytes(4 * int(np.prod(shape[:4]))), 0, shape[:4], "float32")
                      if dtype == "int8" else None)
    return pools, scales


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    out = view(aligned_bytes(array.nbytes), 0, array.shape, str(array.dtype))
    out[...] = array
    return out


def _load_weights(artifact: Artifact, names: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The kernels' weights copied once into one huge-page arena (64-byte aligned each) as TVM tensors."""
    source = {name: kernel_weight(name, artifact.weights) for name in sorted(names)}
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
