"""The device runner (what runs CUDA kernels) driven with CPU kernels on tvm.cpu(): separate device
buffers, host<->device copies and views must give exactly the KernelRunner's numbers."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.cuda_runner import DeviceKernelRunner
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner

PROMPTS = [[5, 17, 3], [9] * 21, list(range(40, 75))]


@pytest.fixture(scope="module")
def artifact(tiny_artifact):
    return load_artifact(tiny_artifact(CompileOptions(
        quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False),
        memory=MemoryOptions(context=128, concurrency=2, kv_dtype="int8"))))


def test_device_runner_equals_kernel_runner_step_by_step(artifact):
    import tvm

    host, device = KernelRunner(artifact), DeviceKernelRunner(artifact, tvm.cpu(0))
    tables = np.broadcast_to(np.arange(host.max_blocks, dtype=np.int32), (20, host.max_blocks))
    tokens, positions = np.arange(3, 23, dtype=np.int64), np.arange(20, dtype=np.int64)
    np.testing.assert_array_equal(device.run(tokens, positions, tables), host.run(tokens, positions, tables))
    one = (np.array([7], np.int64), np.array([20], np.int64), tables[:1])
    np.testing.assert_array_equal(device.run(*one, logits_rows=[0]), host.run(*one, logits_rows=[0]))


def test_batched_greedy_on_the_device_runner_equals_the_kernel_runner(artifact):
    import tvm

    outputs = []
    for runner in (KernelRunner(artifact), DeviceKernelRunner(artifact, tvm.cpu(0))):
        engine = Engine(runner)
        seqs = [engine.add(Request(p, 10)) for p in PROMPTS]
        engine.run_until_done()
        outputs.append([s.generated for s in seqs])
    assert outputs[0] == outputs[1]


def test_prefill_last_equals_the_last_row_of_a_full_prefill(artifact):
    from bitsmith.runtime.session import CompiledSession

    session = CompiledSession(artifact)
    prompt = [3 + i % 90 for i in range(100)]  # chunks of 64 (no logits) and 36 rows (logits of one row)
    full = session.prefill(prompt)[-1]
    session.reset()
    np.testing.assert_allclose(session.prefill_last(prompt), full, rtol=1e-5, atol=1e-5 * np.abs(full).max())
