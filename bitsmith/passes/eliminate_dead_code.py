"""Dead-code elimination: drop nodes no output depends on, and weights no function reads."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.ir import Module
from bitsmith.passes.base import PassContext
from bitsmith.passes.manager import Pass


@dataclass(frozen=True)
class EliminateDeadCode(Pass):
    name = "eliminate_dead_code"

    def run(self, module: Module, ctx: PassContext) -> Module:
        functions = {k: dead_code_elimination(f) for k, f in module.functions.items()}
        used = {n.attrs["name"] for f in functions.values() for n in f.nodes if n.op == "weight"}
        for name in set(ctx.weights) - used:
            ctx.weights.pop(name)
        return module.replace(functions=functions, weights={k: t for k, t in module.weights.items() if k in used})
