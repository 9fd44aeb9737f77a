"""Runs an artifact's CUDA kernel schedules with the TVM runtime only: weights and KV pools stay on the GPU."""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.step_runner import StepRunner, bind_calls, constant_arrays, kernel_plan, pool_shape, used_weights
from bitsmith.runtime.interleave import kernel_weight
from bitsmith.runtime.kernel_dtypes import kernel_array
from bitsmith.runtime.kv_layout import pool_storage
from bitsmith.runtime.schedule import Schedule

# A step on the GPU, host <-> device traffic only at its two ends:
#
#   host: tokens, positions, block tables ──copy──▶ device input buffers
#   device: every kernel of the schedule, launched back to back on the default stream
#           (weights, KV pools, the step's buffers all resident)
#   device logits[:n] ──copy──▶ host   (the copy waits for the launches: the step's one sync)
#
# Each schedule buffer is its own device allocation (GPU memory is not the constraint the CPU arena
# plan is for), seen by each call in the call's shape through a view at offset 0.


def _load_cuda_backend() -> None:
    """TVM's CUDA device API lives in libtvm_runtime_cuda.so, which a runtime-only install (no
    compiler library) does not load by itself."""
    import tvm  # heavy: TVM

    if _cuda_registered():
        return
    plugin = Path(tvm.__file__).parent / "lib" / "libtvm_runtime_cuda.so"
    if not plugin.is_file():
        raise BitsmithError("this TVM has no CUDA runtime (libtvm_runtime_cuda.so)", where=str(plugin.parent),
                            fix="install apache-tvm (its wheel ships the CUDA runtime) or use a CPU artifact")
    try:
        ctypes.CDLL(str(plugin), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:  # no libcuda.so.1: no NVIDIA driver on this machine
        raise BitsmithError(f"TVM's CUDA runtime does not load: {exc}", where=str(plugin),
                            fix="run CUDA artifacts on a machine with an NVIDIA driver") from exc


def _cuda_registered() -> bool:
    import tvm  # heavy: TVM

    return tvm.get_global_func("device_api.cuda", allow_missing=True) is not None


def cuda_device_present() -> bool:
    """A CUDA GPU is visible to TVM here (loads the CUDA backend when needed)."""
    import tvm  # heavy: TVM

    try:
        _load_cuda_backend()
    except BitsmithError:
        return False
    return bool(tvm.cuda(0).exist)


class _DeviceStep:
    """One schedule bound to device memory: kernel functions with their argument tensors ready."""

    def __init__(self, schedule: Schedule, library: Any, bound: dict[str, Any], dev: Any) -> None:
        import tvm  # heavy: TVM

        self.schedule = schedule
        self.buffers = {name: tvm.runtime.empty((max(slot.nbytes, 1),), "uint8", dev)
                        for name, slot in schedule.buffers.items()}
        tensors: dict[tuple[str, tuple[int, ...]], Any] = {}

        def buffer_tensor(name: str, shape: tuple[int, ...]) -> Any:
            if (name, shape) not in tensors:
                tensors[name, shape] = self.buffers[name]._create_view(shape, schedule.buffers[name].dtype, 0)
            return tensors[name, shape]

        self.calls = bind_calls(schedule, library, buffer_tensor, bound)
        rows = schedule.rows
        self.tokens = buffer_tensor(schedule.inputs["tokens"], (rows,))
        self.positions = buffer_tensor(schedule.inputs["positions"], (rows,))
        tables = schedule.buffers[schedule.inputs["block_tables"]].shape
        self.block_tables = buffer_tensor(schedule.inputs["block_tables"], tuple(tables))
        self.logits = buffer_tensor(schedule.output, tuple(schedule.buffers[schedule.output].shape))
        self.host_tokens = np.zeros(rows, dtype=np.int64)
        self.host_positions = np.full(rows, -1, dtype=np.int64)
        self.host_tables = np.zeros(tables, dtype=np.int32)
        ring = schedule.inputs.get("ring_tables")  # windowed layers' ring tables, when the KV plan has rings
        self.ring_tables = buffer_tensor(ring, tuple(schedule.buffers[ring].shape)) if ring else None
        self.host_rings = np.zeros(schedule.buffers[ring].shape, dtype=np.int32) if ring else None

    def run(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
            ring_tables: np.ndarray | None = None) -> np.ndarray:
        """Logits [n, vocab] of n = len(tokens) rows (the rest padding: position -1, no cache write)."""
        n = len(tokens)
        self.host_tokens[:n], self.host_tokens[n:] = tokens, 0
        self.host_positions[:n], self.host_positions[n:] = positions, -1
        self.host_tables[:n] = block_tables
        self.tokens.copyfrom(self.host_tokens)
        self.positions.copyfrom(self.host_positions)
        self.block_tables.copyfrom(self.host_tables)
        if self.ring_tables is not None:
            if ring_tables is None:
                raise BitsmithError("the artifact's windowed layers keep their KV in rings: pass ring_tables",
                                    where="device kernel runner", fix="run it through the Engine or CompiledSession")
            self.host_rings[:n] = ring_tables
            self.ring_tables.copyfrom(self.host_rings)
        for func, args in self.calls:
            func(*args)
        return self.logits.numpy().reshape(self.schedule.rows, -1)[:n]


class DeviceKernelRunner(StepRunner):
    """KernelRunner's interface over kernels on a TVM device: rows of several sequences per call, the
    paged KV pools on the device. The lm_head runs for every row (cheap on a GPU); only the asked rows
    come back. CudaKernelRunner is this on a GPU; on tvm.cpu() it runs CPU kernels the same way (how
    the device path is tested on machines without a GPU)."""

    def __init__(self, artifact: Artifact, device: Any) -> None:
        import tvm  # heavy: TVM

        plan = kernel_plan(artifact)
        if plan is None:
            raise BitsmithError("the artifact has no compiled kernels", where=str(artifact.directory),
                                fix="recompile with `--target host` or `--target cuda`")
        self.device = device
        library = tvm.runtime.load_module(str(artifact.directory / plan.library))
        weights = {name: tvm.runtime.tensor(kernel_array(np.ascontiguousarray(kernel_weight(name, artifact.weights))),
                                            device) for name in used_weights(plan)}  # bf16 as its uint16 bits
        constants = {name: tvm.runtime.tensor(a, device) for name, a in constant_arrays(plan).items()}
        pools, scales = _device_pools(plan.kv, device)
        bound = {"weight": weights, "const": constants, "cache": dict(enumerate(pools)),
                 "kv_scales": {layer: s for layer, s in enumerate(scales) if s is not None}}
        self._set_steps(plan, [_DeviceStep(s, library, bound, device) for s in plan.schedules.values()])

    def run(self, tokens: np.ndarray, positions: np.ndarray, block_tables: np.ndarray,
            logits_rows: np.ndarray | list[int] | None = None, ring_tables: np.ndarray | None = None) -> np.ndarray:
        """Logits [n, vocab], or of just `logits_rows`; block_tables int32 [n, max_blocks]; ring_tables as
        KernelRunner.run's."""
        logits = self._step_for(len(tokens)).run(tokens, positions, block_tables, ring_tables)
        return logits if logits_rows is None else logits[np.asarray(logits_rows, dtype=np.int64)]


class CudaKernelRunner(DeviceKernelRunner):
    """An artifact's CUDA kernels (`--target cuda`) on GPU `device_id`."""

    def __init__(self, artifact: Artifact, device_id: int = 0) -> None:
        import tvm  # heavy: TVM

        plan = kernel_plan(artifact)
        if plan is None or plan.device != "cuda":
            raise BitsmithError("the artifact has no CUDA kernels", where=str(artifact.directory),
                                fix="recompile with `--target cuda --arch sm_XX`")
        if not cuda_device_present():
            raise BitsmithError(f"no CUDA GPU is visible for kernels built for {plan.target_cpu}",
                                where=str(artifact.directory / plan.library),
                                fix="run on a machine with an NVIDIA GPU and driver, or recompile with `--target host`")
        super().__init__(artifact, tvm.cuda(device_id))


def _device_pools(kv: dict[str, Any], dev: Any) -> tuple[list[Any], list[Any | None]]:
    """Per layer the block pool [num_blocks, 2, block_size, kv_heads, head_dim] in the layer's KV
    dtype, and fp32 scales [num_blocks, 2, block_size, kv_heads] for int8 layers (int4: runtime/kv_layout.py).
    Not zeroed: a slot is always written before any row reads it."""
    import tvm  # heavy: TVM

    layouts = [pool_storage(kv_dtype, pool_shape(kv, layer))  # (ring layers' are smaller)
               for layer, kv_dtype in enumerate(kv["layer_dtypes"])]
    pools = [tvm.runtime.empty(shape, dtype, dev) for shape, dtype, _ in layouts]
    scales = [tvm.runtime.empty(scales_shape, "float32", dev) if scales_shape else None for _, _, scales_shape in layouts]
    return pools, scales
