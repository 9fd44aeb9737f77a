"""The pass manager: a pass states the facts it requires and provides; `run_passes` checks the whole list
against them before running anything, then runs it, verifying and dumping after every pass."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

from bitsmith.compiler.ir import Module
from bitsmith.compiler.printer import print_module
from bitsmith.compiler.verify import verify_function, verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import PassContext
from bitsmith.passes.dump import Snapshot

# Facts a pass may require or provide. A module from a hand-built frontend starts `canonical` (prefill and
# decode, LLM-level ops); a traced one (torch.export, ONNX: prefill alone) starts `traced`.
FACTS = ("traced", "canonical", "norms_folded", "rotated", "precision_planned", "quantized", "cast", "packed", "kv_planned", "lowered")


class Pass:
    """A named step over the module: `run(module, ctx)` returns the module after the pass (a new one when
    it changed) and may write the context (see PassContext). `requires` are facts that must hold before
    it runs (`requires_when`: {fact: fact that must also hold when the first does}); `provides` are facts that
    hold after it and `invalidates` those that no longer do."""

    name: ClassVar[str]
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    requires_when: ClassVar[dict[str, str]] = {}
    invalidates: ClassVar[frozenset[str]] = frozenset()
    registry: ClassVar[dict[str, type["Pass"]]] = {}  # every pass class by name: says who provides a fact

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            Pass.registry[cls.name] = cls
        named = cls.requires | cls.provides | cls.invalidates | set(cls.requires_when) | set(cls.requires_when.values())
        unknown = named - set(FACTS)
        if unknown:
            raise TypeError(f"pass {cls.__name__} names unknown facts {sorted(unknown)} (known: {FACTS})")

    def run(self, module: Module, ctx: PassContext) -> Module:
        raise NotImplementedError


def is_traced(module: Module) -> bool:
    """A traced module (torch.export, ONNX) has `prefill` alone; a hand-built or canonicalized one has both entries."""
    return "decode" not in module.functions


def module_facts(module: Module) -> frozenset[str]:
    """What holds of a module before any pass: both entry points make it canonical, prefill alone traced."""
    if not is_traced(module):
        return frozenset({"canonical"})
    return frozenset({"traced"}) if "prefill" in module.functions else frozenset()


def verify_ir(module: Module) -> None:
    """The IR verifier; a traced module (prefill alone, before derive_decode) is checked function by function."""
    if not is_traced(module):
        verify_module(module)
    else:
        for fn in module.functions.values():
            verify_function(fn, module)


def _providers(fact: str, passes: Sequence[Pass]) -> list[str]:
    listed = [p.name for p in passes if fact in p.provides]
    return listed or sorted(n for n, cls in Pass.registry.items() if fact in cls.provides)


def check_order(passes: Sequence[Pass], facts: Iterable[str]) -> None:
    """Refuse a list where some pass requires a fact that no pass before it (nor the input) establishes."""
    have = set(facts)
    for index, p in enumerate(passes):
        missing = (p.requires | {then for given, then in p.requires_when.items() if given in have}) - have
        for fact in sorted(missing):
            providers = _providers(fact, passes)
            later = [q.name for q in passes[index + 1:] if fact in q.provides]
            if later:
                fix = f"run {later[0]} before {p.name}"
            elif providers:
                fix = f"add {' or '.join(providers)} before {p.name}"
            else:
                fix = "no pass provides it: start from a module that has it"
            who = f", which {' / '.join(providers)} provides" if providers else ""
            raise BitsmithError(f"{p.name} requires the fact {fact!r}{who}, and it does not hold before "
                                f"{p.name} (step {index + 1}; holding: {', '.join(sorted(have)) or 'nothing'})",
                                where=f"pass {p.name}", fix=fix)
        have = (have - p.invalidates) | p.provides


def run_passes(module: Module, ctx: PassContext, passes: Sequence[Pass], verify: bool = True,
               dump_dir: str | Path | None = None, log: Callable[[str], None] | None = None,
               facts: Iterable[str] | None = None) -> Module:
    """Run `passes` in order after checking their requires against `facts` (default: the module's own),
    verifying the IR after each and, with `dump_dir`, writing the IR and side tables after each, numbered."""
    check_order(passes, module_facts(module) if facts is None else facts)
    dump = Path(dump_dir) if dump_dir else None
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / "00-input.ir").write_text(print_module(module))
    if verify:
        verify_ir(module)
    for index, p in enumerate(passes, start=1):
        if log:
            log(f"pass {p.name}")
        before = Snapshot.of(module, ctx) if dump else None
        try:
            module = p.run(module, ctx)
        except BitsmithError as exc:
            if exc.where is None or "pass" not in exc.where:
                exc.where = f"pass {p.name}" + (f", {exc.where}" if exc.where else "")
            raise
        if verify:
            verify_ir(module)
        if dump:
            stem = f"{index:02d}-{p.name}"
            (dump / f"{stem}.ir").write_text(print_module(module))
            for suffix, text in before.side_tables(module, ctx).items():
                (dump / f"{stem}.{suffix}").write_text(text)
    return module
