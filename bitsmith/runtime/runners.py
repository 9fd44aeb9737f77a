"""Kernel runners by device kind: the artifact's kernel plan says which kind its library is for."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.cuda_runner import CudaKernelRunner, cuda_device_present
from bitsmith.runtime.executor import KernelRunner, runs_on_this_cpu
from bitsmith.runtime.schedule import KernelPlan
from bitsmith.runtime.step_runner import kernel_plan


@dataclass(frozen=True)
class RunnerKind:
    open: Callable[[Artifact], Any]  # the runner of an artifact whose kernels are for this device kind
    runs_here: Callable[[KernelPlan], bool]  # can this machine run the plan's library?


RUNNERS: dict[str, RunnerKind] = {
    "cpu": RunnerKind(KernelRunner, runs_on_this_cpu),
    "cuda": RunnerKind(CudaKernelRunner, lambda plan: cuda_device_present()),
}


def open_runner(artifact: Artifact) -> Any:
    """The runner for the artifact's kernels; an artifact without kernels (compiled with --target none) is refused:
    nothing falls back to the reference executor unless the user asks for it."""
    plan = kernel_plan(artifact)
    if plan is None:
        raise BitsmithError("the artifact has no compiled kernels (it was compiled with `--target none`)",
                            where=str(artifact.directory),
                            fix="recompile with `--target host` (or `--target cuda`), or run it on the numpy reference "
                                "executor with `bitsmith run/eval ... --executor reference`")
    return RUNNERS[plan.device].open(artifact)


def runs_here(plan: KernelPlan) -> bool:
    return RUNNERS[plan.device].runs_here(plan)
