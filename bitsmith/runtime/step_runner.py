"""What every kernel runner shares: the artifact's kernel plan, calls bound to their arguments, the paged KV
geometry and the choice of step by row count."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.schedule import KernelPlan, Schedule


def kernel_plan(artifact: Artifact) -> KernelPlan | None:
    entry = artifact.manifest.get("kernels")
    return KernelPlan.from_json(entry) if entry else None


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


def used_weights(plan: KernelPlan) -> list[str]:
    """Names of the weights some kernel call of the plan reads."""
    return sorted({ref for s in plan.schedules.values() for c in s.calls for kind, ref, *_ in c.args if kind == "weight"})


def constant_arrays(plan: KernelPlan) -> dict[str, np.ndarray]:
    """The plan's constant tables (rope frequencies) as arrays."""
    return {name: np.asarray(c["values"], dtype=c["dtype"]).reshape(c["shape"]) for name, c in plan.constants.items()}


def pool_shape(kv: dict[str, Any], layer: int | None = None) -> tuple[int, int, int, int, int]:
    """A layer's block pool: [blocks, 2 (keys, values), block_size, kv_heads, head_dim], as logical elements
    (runtime/kv_layout.py `pool_storage`: how each KV dtype stores it, int8/int4 with fp32 scales).
    blocks: num_blocks, or for a windowed layer with a ring (passes/kv_plan.py)
    ring_slots x ring_blocks. layer None: the shape of a global layer's pool."""
    ring = int(kv.get("ring_blocks", 0))
    windows = kv.get("layer_windows") or ()
    blocks = int(kv["num_blocks"])
    if layer is not None and ring and windows and windows[layer]:
        blocks = int(kv["ring_slots"]) * ring
    return blocks, 2, int(kv["block_size"]), int(kv["kv_heads"]), int(kv["head_dim"])


class StepRunner:
    """What every kernel runner shares: its steps (one per schedule, fewest rows first), the paged KV
    geometry, and the choice of the smallest step that holds n rows."""

    def _set_steps(self, plan: KernelPlan, steps: list[Any]) -> None:
        self.kv = plan.kv
        self.steps = sorted(steps, key=lambda st: st.schedule.rows)
        self.max_rows = self.steps[-1].schedule.rows
        self.block_size, self.num_blocks = int(plan.kv["block_size"]), int(plan.kv["num_blocks"])
        self.max_blocks, self.max_context = int(plan.kv["max_blocks"]), int(plan.kv["max_context"])
        # windowed layers' rings (0: none): sequence slot s < ring_slots owns ring blocks s*ring_blocks...
        self.ring_blocks, self.ring_slots = int(plan.kv.get("ring_blocks", 0)), int(plan.kv.get("ring_slots", 0))

    def ring_table(self, slot: int) -> np.ndarray:
        """The ring table int32 [ring_blocks] of sequence slot `slot`."""
        return np.arange(slot * self.ring_blocks, (slot + 1) * self.ring_blocks, dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        """The logits' width (the model's vocabulary, which may be padded past the tokenizer's)."""
        schedule = self.steps[0].schedule
        return int(schedule.buffers[schedule.output].shape[-1])

    @property
    def step_rows(self) -> tuple[int, ...]:
        """The row counts of the steps (a call of n rows pays for the smallest that holds n)."""
        return tuple(s.schedule.rows for s in self.steps)

    def _step_for(self, n: int) -> Any:
        if n > self.max_rows:
            raise BitsmithError(f"{n} rows exceed the largest schedule ({self.max_rows})",
                                where="kernel runner", fix="split the batch")
        return next(s for s in self.steps if s.schedule.rows >= n)
