"""Precision assignment: decide a scheme (or 16-bit) for every linear weight; the plan goes into module.meta."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bitsmith.compiler.analysis import weight_uses
from bitsmith.compiler.experts import router_weights
from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.calibrate import layer_index
from bitsmith.passes.manager import Pass
from bitsmith.runtime.quant_scheme import SUPPORTED_METHODS, QuantScheme, parse_scheme

KEEP = None  # plan value for "stay 16-bit"
KEEP_SCHEMES = ("16", "fp16", "keep")  # --scheme values that mean 16-bit


def linear_weights(module: Module) -> list[str]:
    """Weights read as the matrix of a `linear` node and by nothing else, in module order; and the stacked expert
    tensors of `moe` nodes (`layers.N.mlp.experts.gate_up_proj` [E, out, in], quantized per expert slice).

    A tied embedding (read by `embedding` too) is not quantizable here: it must stay dense for the lookup.
    """
    uses = weight_uses(module)
    return [name for name in module.weights if uses.get(name) in ({"linear:1"}, {"moe:3"}, {"moe:4"})]


def override_scheme(text: str, default: QuantScheme) -> QuantScheme:
    """A scheme string where the options it leaves out (group, symmetry, method) come from `default`."""
    parsed = parse_scheme(text)
    if (parsed.offset or parsed.super_group) and parsed.method != "imported":
        raise BitsmithError(f"scheme {text!r}: the min form and s256 super-groups are what pre-quantized sources "
                            "(GGUF Q4_1, K-quants) bring in; bitsmith's quantizers write sym or asym",
                            where="--scheme", fix="use e.g. 'int4-g32-asym' (or import the GGUF as it is)")
    tokens = text.strip().lower().split("-")[1:]
    given_group = any(t == "pc" or (t.startswith("g") and t[1:].isdigit()) for t in tokens)
    given_sym = any(t in ("sym", "asym", "min") for t in tokens)
    given_method = any(t in SUPPORTED_METHODS for t in tokens)
    return QuantScheme(
        bits=parsed.bits,
        group_size=parsed.group_size if given_group else default.group_size,
        sym=parsed.sym if given_sym else default.sym,
        method=parsed.method if given_method else default.method,
        offset=parsed.offset if given_sym else default.offset,
        super_group=parsed.super_group,
    )


def matches_pattern(pattern: str, name: str) -> bool:
    """Glob on the weight name, with or without its `.weight` suffix; a bare suffix matches anywhere."""
    stem = name.removesuffix(".weight")
    return any(fnmatch.fnmatchcase(candidate, p) for candidate in (name, stem)
               for p in (pattern, f"*.{pattern}", f"*{pattern}"))


@dataclass(frozen=True)
class AssignPrecision(Pass):
    """Default policy: keep lm_head, the first and last decoder layers and MoE routers 16-bit, quantize the rest.
    Weights a pre-quantized source gave codes for keep their own scheme (lossless; edge layers too), unless a
    --scheme or --keep pattern names them: then they are requantized from their dequantized values, or kept."""

    default: QuantScheme
    keep_default: bool = True
    keep: tuple[str, ...] = ()  # patterns forced to 16-bit
    overrides: tuple[tuple[str, str], ...] = ()  # (pattern, scheme string), later wins
    imported: tuple[tuple[str, str], ...] = ()  # (weight, its imported scheme's name)
    quantize_rest: bool = True  # False: only imported weights are quantized (no --method/--scheme given)
    name = "assign_precision"
    requires = frozenset({"canonical"})
    provides = frozenset({"precision_planned"})

    def plan(self, module: Module) -> dict[str, QuantScheme | None]:
        candidates = linear_weights(module)
        layers = [i for n in module.weights if (i := layer_index(n)) is not None]
        edge = {min(layers), max(layers)} if layers else set()
        routers = router_weights(module)  # MoE routers: E x hidden, tiny, and a rounding flips expert choices
        plan: dict[str, QuantScheme | None] = {}
        for name in candidates:
            is_edge = layer_index(name) in edge or layer_index(name) is None  # lm_head has no layer
            keep = not self.quantize_rest or (self.keep_default and (is_edge or name in routers))
            plan[name] = KEEP if keep else self.default
        rotation = module.meta.get("rotation", {})
        for kept in (rotation.get("untied_head"), rotation.get("head_norm")):
            if kept in plan:  # fold_norm_scales' untied head (was the 16-bit table) or its tied head's norm scale
                plan[kept] = KEEP
        for name, scheme in self.imported:
            if name not in plan:
                raise BitsmithError(f"the source gave codes for {name!r}, which is not a linear weight of the IR",
                                    where=f"pass {self.name}", fix="compile with --requantize (report this model)")
            plan[name] = parse_scheme(scheme)
        for pattern, scheme in self.overrides:
            self._apply(plan, pattern, KEEP if scheme in KEEP_SCHEMES else override_scheme(scheme, self.default))
        for pattern in self.keep:  # an explicit --keep wins over any --scheme
            self._apply(plan, pattern, KEEP)
        return plan

    def _apply(self, plan: dict[str, QuantScheme | None], pattern: str, value: QuantScheme | None) -> None:
        hits = [name for name in plan if matches_pattern(pattern, name)]
        if not hits:
            raise BitsmithError(f"pattern {pattern!r} matches no quantizable weight", where=f"pass {self.name}",
                                fix="see `bitsmith inspect MODEL --json` for weight names, e.g. 'layers.0.*' "
                                    "or 'mlp.down_proj'")
        for name in hits:
            plan[name] = value

    def run(self, module: Module, ctx: PassContext) -> Module:
        plan = self.plan(module)
        meta = dict(module.meta)
        meta["precision_plan"] = {k: (v.to_json() if v else None) for k, v in plan.items()}
        return module.replace(meta=meta)
