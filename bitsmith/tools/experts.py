"""The mixture-of-experts part of `inspect`: per MoE block its experts, their bytes and usage, and the weight bytes a
decode token reads (only the chosen experts) against all the weights stored."""

from __future__ import annotations

from typing import Any, Mapping

from bitsmith.compiler.experts import expert_weights
from bitsmith.compiler.ir import Module


def experts_summary(module: Module, nbytes: Mapping[str, int]) -> dict[str, Any] | None:
    """None without experts. `nbytes`: logical weight name -> stored bytes (a stacked expert tensor by its float
    name, its packed parts folded in). Expert e of block B is named `B.experts[e]` (its slices
    `B.experts.gate_up_proj[e]`, `B.experts.down_proj[e]`); frequency[e] is the share of calibration tokens
    routed to it (measure_expert_usage; absent when the compile did not calibrate)."""
    stacked = expert_weights(module)
    if not stacked:
        return None
    usage = module.meta.get("expert_usage", {})
    blocks: dict[str, dict[str, Any]] = {}
    for w in stacked.values():
        block = blocks.setdefault(w.block, {"experts": w.experts, "top_k": w.top_k, "tensors": [], "bytes": 0})
        block["tensors"].append(w.name)
        block["bytes"] += int(nbytes[w.name])
    for name, block in blocks.items():
        per_expert = block["bytes"] // block["experts"]
        freq = usage.get(name, {}).get("frequency")
        block["tokens"] = usage.get(name, {}).get("tokens")
        block["per_expert"] = [{"expert": f"{name}.experts[{e}]", "bytes": per_expert,
                                "frequency": freq[e] if freq else None} for e in range(block["experts"])]
    total = int(sum(nbytes.values()))
    expert_bytes = sum(b["bytes"] for b in blocks.values())
    active = sum(b["bytes"] * b["top_k"] // b["experts"] for b in blocks.values())
    return {"blocks": blocks, "weight_bytes": total, "expert_bytes": expert_bytes,
            "decode_bytes_per_token": total - expert_bytes + active}


def format_experts(summary: dict[str, Any]) -> list[str]:
    blocks = summary["blocks"]
    first = next(iter(blocks.values()))
    mib = 2 ** 20
    lines = [f"experts: {len(blocks)} MoE blocks, {first['top_k']} of {first['experts']} experts per token; weights "
             f"{summary['weight_bytes'] / mib:.2f} MiB stored (experts {summary['expert_bytes'] / mib:.2f} MiB), "
             f"a decode token reads {summary['decode_bytes_per_token'] / mib:.2f} MiB (only its chosen experts)"]
    for name, b in blocks.items():
        freq = [e["frequency"] for e in b["per_expert"]]
        used = (f"usage on {b['tokens']:,} calibration tokens: " + " ".join(f"{f:.2f}" for f in freq)
                if b["tokens"] else "usage not measured (compile with calibration: a quantized compile)")
        lines.append(f"  {name}.experts[0..{b['experts'] - 1}]: {b['per_expert'][0]['bytes'] / 1024:.1f} KiB each; "
                     + used)
    return lines
