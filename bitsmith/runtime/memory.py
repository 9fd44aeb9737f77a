"""What serving an artifact holds in memory, predicted from its manifest and weight file (inspect, bench/scale.py)."""

from __future__ import annotations

from typing import Any

import numpy as np

from bitsmith.runtime.arena import round_up
from bitsmith.runtime.artifact import Artifact
from bitsmith.runtime.interleave import kernel_weight_layout
from bitsmith.runtime.kv_layout import pool_bytes, token_bytes
from bitsmith.runtime.step_runner import constant_arrays, kernel_plan, pool_shape, used_weights

# The process before any weight: Python, numpy, the TVM runtime (tvm_ffi also imports torch where it is
# installed) and a kernel library. Measured: `bitsmith run` of TinyStories-656K (weights, KV pools and arenas
# under 10 MB) peaks at 398 MB on x86-64 with apache-tvm 0.27.
RUNTIME_BASE_BYTES = 390 << 20
# The same for a bundle (`bitsmith package`): TVM's runtime library only, no compiler library, no torch. Measured:
# the TinyStories-656K aarch64 bundle serving one request under QEMU user-mode (cortex-a76) peaks at 166 MiB, of
# which QEMU's own translation buffers are ~55 MiB (the x86-64 bundle natively: 102 MiB), so on the device this
# over-predicts by about that much (tests/tools/test_emulate.py checks it against the SmolLM2 int4 bundle).
BUNDLE_RUNTIME_BASE_BYTES = 160 << 20


def serving_memory(artifact: Artifact, runtime: int = RUNTIME_BASE_BYTES) -> dict[str, Any] | None:
    """Bytes the compiled executor keeps resident, by part, or None for an artifact without kernels.

    weights: the kernels' weights, each copied once into one huge-page arena (interleaved ones in their
    kernel layout: the same bytes as stored); nothing else of the weight file stays resident.
    workspace: every schedule's activation arena (each row count has its own).
    runtime: the process before any weight (RUNTIME_BASE_BYTES for `bitsmith run/serve`, BUNDLE_RUNTIME_BASE_BYTES
    for a bundle's launchers).
    kv_cache: the paged KV pools; their pages become resident as sequences fill them, so `loaded` (right after
    loading) leaves them out and `full` (every block in use) counts them.
    """
    plan = kernel_plan(artifact)
    if plan is None:
        return None
    stored = artifact.stored_weights
    weights = 0
    for name in used_weights(plan):
        shape, dtype = kernel_weight_layout(name, stored)
        weights += round_up(int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
    workspace = sum(s.arena_bytes for s in plan.schedules.values())
    constants = sum(a.nbytes for a in constant_arrays(plan).values())
    kv = 0
    for layer, dtype in enumerate(plan.kv["layer_dtypes"]):  # (a windowed layer's ring pool is smaller)
        kv += pool_bytes(dtype, pool_shape(plan.kv, layer))  # (int8/int4: with their fp32 scales)
    loaded = runtime + weights + workspace + constants
    return {"runtime": runtime, "weights": weights, "workspace": workspace + constants, "kv_cache": kv,
            "loaded": loaded, "full": loaded + kv}


def decode_traffic(artifact: Artifact) -> dict[str, int] | None:
    """Bytes one decode step (one sequence, the 1-row schedule) reads, by part, or None without kernels: every
    weight a kernel reads once (an embedding gather reads one row of its table), and the KV cache bytes per
    position already cached (keys + values of every layer, int8/int4 with their fp32 scales), which grow with the context.
    A decode step on a CPU streams these from memory, so bandwidth / bytes is its speed ceiling."""
    plan = kernel_plan(artifact)
    if plan is None:
        return None
    schedule = min(plan.schedules.values(), key=lambda s: s.rows)
    stored = artifact.stored_weights
    full, gathered = set(), set()
    for call in schedule.calls:
        names = {ref for kind, ref, *_ in call.args if kind == "weight"}
        (gathered if call.kernel.startswith("embedding") else full).update(names)
    weights, table = 0, 0
    for name in sorted(full | gathered):
        shape, dtype = kernel_weight_layout(name, stored)
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        weights += nbytes if name in full else nbytes // max(int(shape[0]), 1) * schedule.rows
        table += 0 if name in full else int(np.prod(stored[name].shape, dtype=np.int64))
    kv = 0
    for dtype in plan.kv["layer_dtypes"]:
        kv += token_bytes(dtype, int(plan.kv["kv_heads"]), int(plan.kv["head_dim"]))
    # gathered_elements: entries of tables only gathered from (untied embeddings): parameters that cost no FLOPs
    return {"weights": weights, "kv_per_position": kv, "gathered_elements": table}
