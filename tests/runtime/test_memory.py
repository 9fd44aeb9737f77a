"""runtime/memory.py's prediction of serving memory against what the compiled executor actually allocates."""

from __future__ import annotations

import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.memory import RUNTIME_BASE_BYTES, serving_memory
from bitsmith.runtime.session import CompiledSession


@pytest.mark.parametrize("quant,activations", [(QuantOptions(), "float32"),
                                               (QuantOptions("rtn", bits=4, group_size=32), "auto"),
                                               (QuantOptions("rtn", bits=8, group_size=32, keep_default=False), "auto")])
def test_prediction_matches_the_executors_buffers(tiny_artifact, quant, activations):
    path = tiny_artifact(CompileOptions(quant=quant, memory=MemoryOptions(context=64, kv_dtype="float16"),
                                        target=TargetOptions("host", activations=activations)))
    artifact = load_artifact(path)
    predicted = serving_memory(artifact)
    runner = CompiledSession(artifact).runner
    assert predicted["weights"] == runner.weights_arena.nbytes  # every kernel weight, 64-byte aligned, once
    constants = sum(a.nbytes for a in runner._constants.values())
    assert predicted["workspace"] == sum(s.arena.nbytes for s in runner.steps) + constants
    pools = sum(p.nbytes for p in runner.pools) + sum(s.nbytes for s in runner.scales if s is not None)
    assert predicted["kv_cache"] == pools
    assert predicted["loaded"] == RUNTIME_BASE_BYTES + predicted["weights"] + predicted["workspace"]
    assert predicted["full"] == predicted["loaded"] + predicted["kv_cache"]


def test_no_prediction_without_kernels(tiny_artifact):
    path = tiny_artifact(CompileOptions(memory=MemoryOptions(context=64), target=TargetOptions("none")))
    assert serving_memory(load_artifact(path)) is None
