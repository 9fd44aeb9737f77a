"""Runs an artifact's CPU kernel schedules with the TVM runtime and numpy only (no torch, no compiler)."""

from __future__ import annotations

import platform
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.arena import aligned_bytes, round_up, view
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.interleave import X16, kernel_weight, kernel_weight_layout
from bitsmith.runtime.kernel_dtypes import kernel_array
from bitsmith.runtime.kv_layout import pool_storage
from bitsmith.runtime.schedule import KernelPlan, Schedule
from bitsmith.runtime.step_runner import StepRunner, bind_calls, constant_arrays, kernel_plan, pool_shape, used_weights


LOAD_THREADS = 2  # weights filled at once when loading (each thread holds one unpacked weight)


def _machine() -> str:
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine().lower())


def runs_on_this_cpu(plan: KernelPlan) -> bool:
    return plan.arch == _machine()


def _check_runs_here(plan: KernelPlan, directory: Path) -> None:
    machine = _machine()
    if plan.arch != machine:
        raise BitsmithError(f"the kernels were built for {plan.target} ({plan.arch}), this machine is {machine}",
                            where=str(directory / plan.library),
                            fix="recompile on this machine with `--target host`, or use `--executor reference`")


def _tensor(array: np.ndarray) -> Any:
    """A zero-copy TVM tensor over a 64-byte aligned numpy array (bf16 as its uint16 bits, see kernel_dtypes.py)."""
    import tvm  # heavy: TVM

    return tvm.runtime.from_dlpack(kernel_array(array))


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
        ring = schedule.inputs.get("ring_tables")  # windowed layers' ring tables, when the KV plan has rings
        self.ring_tables = self.views[ring] if ring else None
        self.logits = self.views[schedule.output].reshape(schedule.rows, -1)
        self.hidden = self.views[schedule.hidden].reshape(schedule.rows, -1) if schedule.hidden else None

    def run_trunk(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
                  ring_tables: np.ndarray | None = None) -> None:
        """Every call before the lm_head for n = len(tokens) rows; the rest are padding (position -1: no
        cache write). Without a head split this is the whole step."""
        n = len(tokens)
        self.tokens[:n], self.tokens[n:] = tokens, 0
        self.positions[:n], self.positions[n:] = positions, -1
        self.block_tables[:n] = block_tables
        if self.ring_tables is not None:
            if ring_tables is None:
                raise BitsmithError("the artifact's windowed layers keep their KV in rings: pass ring_tables",
                                    where="kernel runner", fix="run it through the Engine or CompiledSession")
            self.ring_tables[:n] = ring_tables
        for func, args in self.calls[:self.schedule.head_from]:
            func(*args)

    def run_head(self, hidden: np.ndarray) -> np.ndarray:
        """Logits [k, vocab] of k hidden-state rows (k <= rows) through the lm_head calls."""
        k = len(hidden)
        self.hidden[:k] = hidden
        for func, args in self.calls[self.schedule.head_from:]:
            func(*args)
        return self.logits[:k].copy()


class KernelRunner(StepRunner):
    """An artifact's kernels, weights and paged KV pools in memory; runs batches of rows.

    A row is one token of one sequence: (token id, position, that sequence's block table). Rows of
    one call may belong to different sequences; the smallest schedule with enough rows runs them.
    """

    def __init__(self, artifact: Artifact) -> None:
        import tvm  # heavy: TVM

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
            logits_rows: np.ndarray | list[int] | None = None, ring_tables: np.ndarray | None = None) -> np.ndarray:
        """Logits [n, vocab], or [len(logits_rows), vocab] for just those rows (the ones that will be
        sampled: the lm_head then runs on them alone); block_tables int32 [n, max_blocks]; ring_tables
        int32 [n, ring_blocks] when the plan has rings (each row's sequence slot's `ring_table`)."""
        n = len(tokens)
        step = self._step_for(n)
        step.run_trunk(tokens, positions, block_tables, ring_tables)
        if step.hidden is None:  # no head split: the trunk computed every row's logits
            rows = slice(None) if logits_rows is None else np.asarray(logits_rows, dtype=np.int64)
            return step.logits[:n][rows].copy()
        hidden = step.hidden[:n] if logits_rows is None else step.hidden[np.asarray(logits_rows, dtype=np.int64)]
        if len(hidden) == 0:
            return np.empty((0, step.logits.shape[1]), dtype=np.float32)
        return self._step_for(len(hidden)).run_head(hidden)


def _allocate_pools(kv: dict[str, Any]) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Per layer: the block pool [num_blocks, 2, block_size, kv_heads, head_dim] of the layer's KV dtype
    and, for int8 layers, fp32 scales [num_blocks, 2, block_size, kv_heads] (int4: a uint8 pool of head_dim / 2
    bytes and scales [..., kv_heads, 2], see runtime/kv_layout.py)."""
    pools, scales = [], []
    for layer, kv_dtype in enumerate(kv["layer_dtypes"]):
        shape, dtype, scales_shape = pool_storage(kv_dtype, pool_shape(kv, layer))
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        pools.append(view(aligned_bytes(nbytes, huge_pages=nbytes >= (8 << 20)), 0, shape, dtype))
        scales.append(view(aligned_bytes(4 * int(np.prod(scales_shape))), 0, scales_shape, "float32")
                      if scales_shape else None)
    return pools, scales


def _aligned_copy(array: np.ndarray) -> np.ndarray:
    out = view(aligned_bytes(array.nbytes), 0, array.shape, str(array.dtype))
    out[...] = array
    return out


def _load_weights(artifact: Artifact, names: list[str]) -> tuple[np.ndarray, dict[str, Any]]:
    """The kernels' weights in one huge-page arena (64-byte aligned each) as TVM tensors.

    Each weight is read from the file straight into its place (no map of the file stays resident, no second
    copy); an interleaved weight (name@x16...) is built from its stored tensor one at a time. Resident memory
    after loading is the arena: the artifact's weight bytes, plus nothing.
    """
    stored = artifact.stored_weights
    layouts = {name: kernel_weight_layout(name, stored) for name in sorted(names)}
    offsets, total = {}, 0
    for name, (shape, dtype) in layouts.items():
        offsets[name] = total
        total += round_up(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    arena = aligned_bytes(total, huge_pages=True)

    def fill(name: str) -> None:
        dst = view(arena, offsets[name], layouts[name][0], str(layouts[name][1]))
        if name in stored:
            stored[name].read_into(dst)
        else:  # unpack + interleave in numpy, which releases the GIL: two weights at a time on two cores
            base = name.partition(X16)[0]
            dst[...] = kernel_weight(name, {base: stored[base].read()})

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        list(pool.map(fill, layouts))
    tensors = {name: _tensor(view(arena, offsets[name], shape, str(dtype))) for name, (shape, dtype) in layouts.items()}
    return arena, tensors
