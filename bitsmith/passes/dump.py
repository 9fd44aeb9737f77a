"""--dump-ir side tables: what a pass did besides the IR (weights it wrote, plans, schedules), small text files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.runtime.quant_scheme import QuantScheme

PACKED_PARTS = (".qweight", ".scales", ".zeros")


@dataclass(frozen=True)
class Snapshot:
    """The context and metadata before a pass (references, not copies: passes write new arrays and objects)."""

    weights: dict[str, Any]  # name -> the store's entry (an array or a StoredTensor), unread
    meta: dict[str, Any]
    kv_plan: Any
    lowered: Any

    @classmethod
    def of(cls, module: Module, ctx: PassContext) -> "Snapshot":
        return cls(ctx.weights.entries(), dict(module.meta), ctx.kv_plan, ctx.lowered)

    def side_tables(self, module: Module, ctx: PassContext) -> dict[str, str]:
        """suffix -> text for what changed since the snapshot ({} when the pass changed only the IR)."""
        tables = {}
        weights = self._weights(ctx)
        if weights:
            tables["weights.txt"] = weights
        plan = module.meta.get("precision_plan")
        if plan is not None and plan != self.meta.get("precision_plan"):
            width = max((len(k) for k in plan), default=0)
            tables["precision_plan.txt"] = "".join(
                f"{name:<{width}}  {_scheme_name(s) if s else '16-bit'}\n" for name, s in plan.items())
        if ctx.kv_plan is not self.kv_plan and ctx.kv_plan is not None:
            data = {"kv_plan": ctx.kv_plan.to_json(), "memory_estimate": ctx.memory_estimate}
            tables["kv_plan.json"] = json.dumps(data, indent=1) + "\n"
        if ctx.lowered is not self.lowered:
            tables["schedules.txt"] = _schedules(ctx)
        return tables

    def _weights(self, ctx: PassContext) -> str:
        changed = [n for n, a in ctx.weights.entries().items() if self.weights.get(n) is not a]
        removed = [n for n in self.weights if n not in ctx.weights]
        if not changed and not removed:
            return ""
        lines = [f"# {len(changed)} written, {len(removed)} removed; name dtype shape [scheme]"]
        width = max(len(n) for n in changed + removed)
        for name in changed:
            shape = "x".join(map(str, ctx.weights.shape(name))) or "scalar"
            scheme = _quantized_scheme(name, ctx)
            lines.append(f"{name:<{width}}  {ctx.weights.dtype(name)}  {shape}" + (f"  {scheme}" if scheme else ""))
        lines += [f"{name:<{width}}  removed" for name in removed]
        return "\n".join(lines) + "\n"


def _scheme_name(data: dict) -> str:
    return QuantScheme.from_json(data).name


def _quantized_scheme(name: str, ctx: PassContext) -> str:
    """The scheme of a quantized weight, or of the quantized weight a packed part belongs to ('' if neither)."""
    if name in ctx.quantized:
        return ctx.quantized[name].scheme.name
    for part in PACKED_PARTS:
        if name.endswith(part) and (source := name.removesuffix(part) + ".weight") in ctx.quantized:
            return ctx.quantized[source].scheme.name
    return ""


def _schedules(ctx: PassContext) -> str:
    if ctx.lowered is None:
        return "no kernels\n"
    lines = [f"# {len(ctx.lowered.specs)} kernels, {len(ctx.lowered.constants)} constant tables",
             "# schedule  entry  rows  calls  arena_bytes"]
    for key, s in ctx.lowered.schedules.items():
        lines.append(f"{key}  {s.entry}  {s.rows}  {len(s.calls)}  {s.arena_bytes}")
    return "\n".join(lines) + "\n"
