"""Per-weight accounting: logical parameters, stored bytes and bits per weight, dense or packed."""

from __future__ import annotations

from typing import Any, Mapping

from bitsmith.compiler.ir import Module


def weight_table(module: Module, nbytes: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """logical weight -> {"params", "bytes", "bits_per_weight", "scheme"}; packed parts are folded together.

    `nbytes` maps stored tensor names to their sizes in bytes.
    """
    plan = module.meta.get("precision_plan", {})
    table: dict[str, dict[str, Any]] = {}
    packed_parts: set[str] = set()
    fn = module["prefill"]
    weight_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
    for node in fn.nodes:
        if node.op == "qmoe":  # two stacked expert tensors [E, out, in], each packed as E qlinear weights
            a, n = node.attrs, 2 if node.attrs["sym"] else 3
            for first, (out, n_in) in ((3, (2 * a["inter"], a["hidden"])), (3 + n, (a["hidden"], a["inter"]))):
                parts = [weight_of[v] for v in node.inputs[first:first + n]]
                stem, params = parts[0].removesuffix(".qweight"), a["experts"] * out * n_in
                size = sum(nbytes[p] for p in parts)
                table[stem] = {"params": params, "bytes": size, "bits_per_weight": 8 * size / params,
                               "scheme": plan.get(stem)}
                packed_parts.update(parts)
        if node.op != "qlinear":
            continue
        parts = [weight_of[v] for v in node.inputs[1:] if v in weight_of and not weight_of[v].endswith(".bias")]
        stem = parts[0].removesuffix(".qweight")
        out = module.weights[parts[0]].shape[0]
        params = out * node.attrs["in_features"]
        size = sum(nbytes[p] for p in parts)
        table[stem + ".weight"] = {"params": params, "bytes": size, "bits_per_weight": 8 * size / params,
                                   "scheme": plan.get(stem + ".weight")}
        packed_parts.update(parts)
    for name, ttype in module.weights.items():
        if name in packed_parts:
            continue
        params = 1
        for d in ttype.shape:
            params *= d
        table[name] = {"params": params, "bytes": nbytes[name],
                       "bits_per_weight": 8 * nbytes[name] / max(params, 1), "scheme": None}
    return table


def summarize(table: dict[str, dict[str, Any]]) -> dict[str, Any]:
    params = sum(r["params"] for r in table.values())
    size = sum(r["bytes"] for r in table.values())
    quant = [r for r in table.values() if r["scheme"]]
    q_params = sum(r["params"] for r in quant)
    return {
        "parameters": params,
        "bytes": size,
        "bits_per_weight": 8 * size / max(params, 1),
        "quantized_parameters": q_params,
        "quantized_bits_per_weight": 8 * sum(r["bytes"] for r in quant) / q_params if q_params else None,
    }
