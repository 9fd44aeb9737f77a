"""Where a module's mixture-of-experts weights are: one stacked tensor per projection, and how many experts a token uses."""

from __future__ import annotations

import re
from dataclasses import dataclass

from bitsmith.compiler.ir import Module

MOE_WEIGHT_INPUTS = {"moe:3": "gate_up", "moe:4": "down"}  # op:slot of the stacked expert tensors


@dataclass(frozen=True)
class ExpertWeight:
    """A stacked expert tensor [experts, out, in] (`layers.N.mlp.experts.gate_up_proj`): `top_k` of its `experts`
    slices are read per token. `block` names the MoE block (the router's usage statistics are keyed by it)."""

    name: str
    block: str
    experts: int
    top_k: int
    out_features: int
    in_features: int

    @property
    def active_fraction(self) -> float:
        return self.top_k / self.experts

    def expert_name(self, e: int) -> str:
        """How inspect and the precision plan name one expert's slice."""
        return f"{self.name}[{e}]"


def block_of(weight: str) -> str:
    """`layers.3.mlp.experts.down_proj` -> `layers.3.mlp` (the MoE block)."""
    match = re.match(r"(.*)\.experts\.[^.]+$", weight.removesuffix(".weight"))
    return match.group(1) if match else weight.rsplit(".", 1)[0]


def expert_weights(module: Module) -> dict[str, ExpertWeight]:
    """Every stacked expert tensor the `decode` entry's moe/qmoe nodes read (the float weight's name for both)."""
    fn = module["decode"] if "decode" in module.functions else module["prefill"]
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    found: dict[str, ExpertWeight] = {}
    for node in fn.nodes:
        if node.op not in ("moe", "qmoe"):
            continue
        top_k = fn.types[node.inputs[1]].shape[1]
        if node.op == "moe":
            e, two_i, h = fn.types[node.inputs[3]].shape
            slots = {3: (two_i, h), 4: (h, two_i // 2)}
        else:
            a = node.attrs
            e, h, two_i = a["experts"], a["hidden"], 2 * a["inter"]
            n = 2 if a["sym"] else 3
            slots = {3: (two_i, h), 3 + n: (h, a["inter"])}
        for slot, (out_f, in_f) in slots.items():
            name = weight_of[node.inputs[slot]]
            if node.op == "qmoe":
                name = name.removesuffix(".qweight")
            found[name] = ExpertWeight(name, block_of(name), int(e), int(top_k), int(out_f), int(in_f))
    return found


def router_weights(module: Module) -> set[str]:
    """Weights of the linears whose output is a `router`'s logits (`layers.N.mlp.gate.weight`)."""
    fn = module["decode"] if "decode" in module.functions else module["prefill"]
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    producer = {n.outputs[0]: n for n in fn.nodes}
    out = set()
    for node in fn.nodes:
        src = producer.get(node.inputs[0]) if node.op == "router" else None
        if src is not None and src.op in ("linear", "qlinear") and src.inputs[1] in weight_of:
            out.add(weight_of[src.inputs[1]])
    return out
