"""measure_expert_usage: how often each expert of each MoE block is chosen on the calibration tokens (into module.meta)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bitsmith.compiler.experts import block_of
from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.calibrate import initial_envs, run_samples, split_by_layer
from bitsmith.passes.manager import Pass

MAX_SAMPLES = 8  # calibration samples routed (a full reference forward each): enough for frequencies to 1e-2


def has_experts(module: Module) -> bool:
    return any(n.op in ("moe", "qmoe") for fn in module.functions.values() for n in fn.nodes)


def routed_experts(module: Module) -> dict[str, tuple[str, int]]:
    """expert-index value of each MoE node in prefill -> (its block, e.g. `layers.3.mlp`, number of experts)."""
    fn = module["prefill"]
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    out = {}
    for node in fn.nodes:
        if node.op in ("moe", "qmoe"):
            name = weight_of[node.inputs[3]].removesuffix(".qweight")
            experts = node.attrs["experts"] if node.op == "qmoe" else fn.types[node.inputs[3]].shape[0]
            out[node.inputs[2]] = (block_of(name), int(experts))
    return out


def measure_usage(module: Module, weights, samples: np.ndarray) -> dict[str, dict]:
    """{block: {experts, top_k, tokens, counts, frequency}}: frequency[e] = share of tokens routed to expert e
    (sums to top_k), from the reference executor over `samples` [S, T]."""
    fn, routed = module["prefill"], routed_experts(module)
    counts = {block: np.zeros(e, np.int64) for block, e in routed.values()}
    top_k: dict[str, int] = {}

    def observe(value: str, idx: np.ndarray) -> None:
        block, experts = routed[value]
        counts[block] += np.bincount(idx.reshape(-1), minlength=experts)[:experts]
        top_k[block] = idx.shape[-1]

    envs = initial_envs(module, samples, caches=2)
    for seg in split_by_layer(module):
        envs = run_samples(fn, seg, envs, weights, observe, set(routed))
    tokens = int(samples.size)
    return {block: {"experts": len(c), "top_k": top_k.get(block, 0), "tokens": tokens, "counts": c.tolist(),
                    "frequency": [round(float(v) / max(tokens, 1), 4) for v in c]} for block, c in counts.items()}


@dataclass(frozen=True)
class MeasureExpertUsage(Pass):
    """Route the calibration tokens (at most MAX_SAMPLES samples) and record each expert's usage frequency in
    module.meta["expert_usage"] for inspect and the precision plan; a model without experts passes through."""

    name = "measure_expert_usage"
    requires = frozenset({"canonical"})
    provides = frozenset()  # a measurement in module.meta, no fact later passes need

    def run(self, module: Module, ctx: PassContext) -> Module:
        if ctx.calibration is None or not has_experts(module):
            return module
        usage = measure_usage(module, ctx.weights, np.asarray(ctx.calibration)[:MAX_SAMPLES])
        return module.replace(meta={**module.meta, "expert_usage": usage})
