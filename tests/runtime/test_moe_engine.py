"""MoE models on compiled kernels in the engine: a batched step whose rows are routed to different experts gives each
sequence exactly what it gets decoded alone (fp32 and int8 experts)."""

from __future__ import annotations

import pytest
import torch

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from family_zoo import zoo_model

PROMPTS = [[5, 17, 3], [9, 90, 31, 8, 77] * 4, [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], [7, 7], list(range(60, 93))]
STEPS = 10


def _alone(runner, prompt):
    engine = Engine(runner)
    seq = engine.add(Request(prompt, STEPS))
    engine.run_until_done()
    return seq.generated


@pytest.mark.parametrize("family,quant", [("mixtral", None), ("qwen3_moe", QuantOptions("rtn", bits=8, group_size=-1,
                                                                                        keep_default=False))])
def test_batched_rows_routed_to_different_experts_equal_each_alone(family, quant, tmp_path):
    model = zoo_model(family)
    model.save_pretrained(tmp_path / "hf")
    options = CompileOptions(memory=MemoryOptions(context=64, concurrency=len(PROMPTS), kv_dtype="float32"),
                             **({"quant": quant} if quant else {}))
    runner = KernelRunner(load_artifact(compile_model(tmp_path / "hf", tmp_path / "art", options)))
    with torch.no_grad():  # the rows of one step do go to different experts (layer 0, transformers' router)
        logits = model(torch.tensor([sum(PROMPTS, [])]), output_router_logits=True).router_logits[0]
    assert len(set(torch.topk(logits, 2, dim=-1).indices[:, 0].tolist())) == logits.shape[-1]
    engine = Engine(runner)
    seqs = [engine.add(Request(p, STEPS)) for p in PROMPTS]
    engine.run_until_done()
    assert engine.stats.steps < 2 * STEPS  # the sequences did share steps (alone: at least STEPS each)
    assert [s.generated for s in seqs] == [_alone(runner, p) for p in PROMPTS]
