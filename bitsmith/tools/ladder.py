"""The gated compile: compile, check the gate, and on failure climb a fallback ladder ordered by measured
per-tensor sensitivity until a rung passes; the chosen artifact's manifest records every attempt."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from bitsmith.compiler.artifact import _prepare_destination, _swap_into_place
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions
from bitsmith.runtime.quant_scheme import QuantScheme
from bitsmith.tools.gate import (DEFAULT_GATE, GateCheck, artifact_size, check_gate, parse_gate, suite_options)
from bitsmith.tools.suites import save_results

KEEP_SHARE = 0.5  # rung 1 keeps the most sensitive tensors until they cover this share of the summed KLD ...
KEEP_PARAMS_SHARE = 0.1  # ... but no more than this share of the quantized parameters (at least one tensor)
FALLBACK_SCHEME = "int8"  # group/method come from the compile's own scheme (override_scheme)
CACHE_ENV = "BITSMITH_SENSITIVITY_CACHE"  # default ~/.cache/bitsmith/search, shared with `bitsmith search`


@dataclass(frozen=True)
class Rung:
    """One plan to try: the compile's own options plus these keeps and scheme overrides (exact weight names)."""

    name: str  # requested | keep-sensitive | int8-group | int8-all
    description: str
    keep: tuple[str, ...] = ()
    overrides: tuple[tuple[str, str], ...] = ()

    def apply(self, options: CompileOptions) -> CompileOptions:
        q = options.quant
        return dataclasses.replace(options, quant=dataclasses.replace(
            q, keep=q.keep + self.keep, schemes=q.schemes + self.overrides))


def group_of(name: str) -> tuple[str, str]:
    """(tensor kind, layer block): `layers.3.mlp.down_proj.weight` -> ("mlp.down_proj", "layers.3")."""
    m = re.search(r"layers\.(\d+)\.", name)
    kind = re.sub(r"^.*layers\.\d+\.", "", name).removesuffix(".weight")
    return kind, f"layers.{m.group(1)}" if m else kind


def build_ladder(quantized: list[str], sensitivity: dict[str, float], params: dict[str, int]) -> list[Rung]:
    """Rungs after the requested plan, from the measured sensitivities (KLD with only that tensor quantized):
    keep the most sensitive at 16-bit; then also int8 for the group (kind or layer block) with the largest summed
    sensitivity left; then int8 for everything the plan quantized. Identical or empty rungs are dropped."""
    ranked = sorted(quantized, key=lambda t: -sensitivity.get(t, 0.0))
    total = sum(sensitivity.get(t, 0.0) for t in quantized) or 1.0
    budget = KEEP_PARAMS_SHARE * sum(params[t] for t in quantized)
    kept: list[str] = []
    for t in ranked:
        covered = sum(sensitivity.get(k, 0.0) for k in kept)
        if kept and (covered >= KEEP_SHARE * total or sum(params[k] for k in kept) + params[t] > budget):
            break
        kept.append(t)
    rungs = []
    if kept:
        share = sum(sensitivity.get(k, 0.0) for k in kept) / total
        rungs.append(Rung("keep-sensitive", f"keep the {len(kept)} most sensitive tensors 16-bit ({100 * share:.0f}% "
                          f"of the measured KLD): {', '.join(kept[:4])}{', ...' if len(kept) > 4 else ''}",
                          keep=tuple(kept)))
    rest = [t for t in quantized if t not in kept]
    groups: dict[str, list[str]] = {}
    for t in rest:
        for g in group_of(t):
            groups.setdefault(g, []).append(t)
    if groups:
        worst = max(groups, key=lambda g: (sum(sensitivity.get(t, 0.0) for t in groups[g]), g))
        summed = sum(sensitivity.get(t, 0.0) for t in groups[worst])
        rungs.append(Rung("int8-group", f"{'also ' if kept else ''}{FALLBACK_SCHEME} for {worst} ({len(groups[worst])} "
                          f"tensors, the group with the largest summed sensitivity left: {summed:.4g})",
                          keep=tuple(kept), overrides=tuple((t, FALLBACK_SCHEME) for t in groups[worst])))
    rungs.append(Rung("int8-all", f"{FALLBACK_SCHEME} for all {len(quantized)} tensors the plan quantized",
                      overrides=tuple((t, FALLBACK_SCHEME) for t in quantized)))
    seen, unique = set(), []
    for r in rungs:
        key = (frozenset(r.keep), frozenset(r.overrides))
        if key not in seen:
            seen.add(key)
            unique.append(r)
    return unique


def plan_of(artifact: Path) -> dict[str, str | None]:
    """weight -> scheme name (None: 16-bit) from the artifact's precision plan."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    plan = manifest["ir"].get("meta", {}).get("precision_plan") or {}
    return {k: QuantScheme.from_json(v).name if v else None for k, v in plan.items()}


def measure(source: str | Path | None, tensors: list[str], options: CompileOptions,
            log: Callable[[str], None] | None, cache: Path | None = None
            ) -> tuple[dict[str, float], dict[str, int], str]:
    """Per-tensor KLD with only that tensor quantized at the probe scheme (search/sensitivity.py and its cache, on
    GateOptions' sensitivity tokens), the tensors' parameter counts, and the probe scheme."""
    from bitsmith.compiler.calibration_data import CalibrationOptions, calibration_tokens
    from bitsmith.compiler.loader import load_model
    from bitsmith.compiler.reference import upcast_weights
    from bitsmith.passes.canonicalize import canonical_model
    from bitsmith.search.run import model_hash
    from bitsmith.search.sensitivity import PROBE, measure_sensitivity

    model = canonical_model(load_model(source, tokenizer=options.tokenizer, log=log))
    present = [t for t in tensors if t in model.weights]
    gate = options.gate
    samples = calibration_tokens(model, CalibrationOptions(None, gate.sensitivity_samples, gate.sensitivity_seqlen, 0))
    if samples is None:
        raise BitsmithError("the model has no tokenizer for the sensitivity text", where="gate ladder",
                            fix="compile a model that ships a tokenizer, or --gate none")
    cache = cache or Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "bitsmith" / "search")
    sens = measure_sensitivity(model.module, upcast_weights(model.weights), samples, present, cache,
                               model_hash(model.source), log)
    params = {t: int(np.prod(model.weights[t].shape)) for t in tensors if t in model.weights}
    return sens.probe_kld, params, PROBE


def _attempt(rung: Rung, artifact: Path, check: GateCheck, seconds: float) -> dict:
    size = artifact_size(artifact)
    schemes: dict[str, int] = {}
    for s in plan_of(artifact).values():
        schemes[s or "16"] = schemes.get(s or "16", 0) + 1
    return {"rung": rung.name, "description": rung.description, "schemes": schemes, "keep": list(rung.keep),
            "overrides": [list(o) for o in rung.overrides], "weight_bytes": int(size["weight_bytes"]),
            "bpw": size["quantized_bpw"] or size["bpw"], "model_bpw": size["bpw"], "metrics": check.metrics,
            "failed": check.failed, "passed": check.passed, "seconds": round(seconds, 1)}


def _badness(attempt: dict, conditions) -> tuple[int, float]:
    """Fewest failed conditions, then the smallest summed relative miss."""
    miss = 0.0
    for c in conditions:
        v = attempt["metrics"].get(c.metric, 0.0)
        if not c.holds(v):
            miss += abs(v - c.threshold) / max(abs(c.threshold), 1e-9)
    return len(attempt["failed"]), miss


def compile_gated(source: str | Path | None, out: str | Path, options: CompileOptions,
                  log: Callable[[str], None] | None = None) -> tuple[Path, dict | None]:
    """compile_model under options.gate: (the artifact, its manifest["gate"] record or None without a gate).
    Rungs are compiled in a work directory beside `out`; only a passing one moves to `out` (nothing else stays)."""
    from bitsmith.pipeline import compile_model  # heavy: TVM
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.tools.suites.reference import is_quantized

    spec = options.gate.spec
    conditions = parse_gate(DEFAULT_GATE if spec == "auto" else spec)
    if not conditions:
        return compile_model(source, out, options, log), None
    generating = sorted({c.suite for c in conditions} - {"ppl"})
    if options.target.name == "none" and generating:  # only ppl runs on the reference executor
        raise BitsmithError(f"--target none has no kernels to run the {', '.join(generating)} suite(s) of the gate",
                            where="--gate", fix="compile for --target host, or gate on ppl metrics only "
                            "(kld, kld_p99, top1, ppl_increase)")
    out = Path(out)
    _prepare_destination(out)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.gate-", dir=out.parent))
    say = log or (lambda _: None)
    try:
        start = time.perf_counter()
        requested = Rung("requested", "the plan as asked")
        first = compile_model(source, work / "0", options, log)
        first_artifact = load_artifact(first, check_hashes=False)
        if spec == "auto" and not is_quantized(first_artifact):
            say("gate: nothing is quantized, so the default gate does not apply")
            _swap_into_place(first, out)
            return out, None
        if first_artifact.manifest.get("tokenizer") is None:
            if spec == "auto":
                say("gate: the model has no tokenizer to run the suites with; the default gate is skipped")
                _swap_into_place(first, out)
                return out, None
            raise BitsmithError("--gate runs text through the artifact, and the model has no tokenizer",
                                where="--gate", fix="compile a model that ships a tokenizer, or --gate none")
        if options.target.name not in ("host", "none"):
            if spec == "auto":
                say(f"gate: kernels for --target {options.target.name} do not run here; the default gate is skipped")
                _swap_into_place(first, out)
                return out, None
            raise BitsmithError(f"--gate needs to run the artifact, and --target {options.target.name} kernels do not "
                                "run on this machine", where="--gate", fix="compile for --target host, or --gate none")
        suites = suite_options(options.gate, conditions, "reference" if options.target.name == "none" else "compiled")
        ctx = min(suites.ctx, first_artifact.max_context - 1)  # a BOS may lead a window
        suites = dataclasses.replace(suites, ctx=ctx)
        spec_text = ",".join(map(str, conditions))
        say(f"gate {spec_text}: suites {', '.join(sorted({c.suite for c in conditions}))} "
            f"(ppl on {suites.tokens} tokens in windows of {suites.ctx}, golden/json on {suites.limit} prompts)")
        record = {"spec": spec_text, "conditions": [c.to_json() for c in conditions], "suites": suites.to_json(),
                  "reference": "", "attempts": [], "chosen": None, "sensitivity": None}
        record["suites"] = json.loads(json.dumps(record["suites"]))  # tuples as the manifest stores them
        rungs, index, artifact, compile_s = [requested], 0, first, time.perf_counter() - start
        chosen_results = None
        while True:
            rung = rungs[index]
            check = check_gate(artifact, conditions, suites, None, log)
            record["reference"] = next(iter(check.results.values())).reference
            record["attempts"].append(_attempt(rung, artifact, check, compile_s + check.seconds))
            a = record["attempts"][-1]
            say(f"gate attempt {index} ({rung.name}): bpw {a['bpw']:.2f}, "
                + ", ".join(f"{c.metric} {check.metrics[c.metric]:.4g}" for c in conditions)
                + (": PASS" if check.passed else f": fail ({'; '.join(check.failed)})"))
            if check.passed:
                record["chosen"], chosen_results = index, check.results
                break
            plan = plan_of(artifact)
            shutil.rmtree(artifact, ignore_errors=True)  # a failed rung is not needed again (the record keeps it)
            if index == 0 and options.gate.ladder:
                quantized = [t for t, s in plan.items() if s is not None]
                t0 = time.perf_counter()
                kld, params, probe = measure(source, quantized, options, log)
                quantized = [t for t in quantized if t in params]
                record["sensitivity"] = {"measured_at": probe, "tensors": {t: kld[t] for t in quantized if t in kld},
                                         "seconds": round(time.perf_counter() - t0, 1)}
                rungs += build_ladder(quantized, kld, params)
                say("gate ladder:\n" + "\n".join(f"  {i}. {r.name}: {r.description}" for i, r in enumerate(rungs)))
            index += 1
            if index >= len(rungs):
                break
            t0 = time.perf_counter()
            artifact = compile_model(source, work / str(index), rungs[index].apply(options), log)
            compile_s = time.perf_counter() - t0
        if record["chosen"] is None:
            best = min(range(len(record["attempts"])), key=lambda i: _badness(record["attempts"][i], conditions))
            a = record["attempts"][best]
            numbers = ", ".join(f"{k} {a['metrics'][k]:.4g}" for k in dict.fromkeys(c.metric for c in conditions))
            raise BitsmithError(
                f"gate {spec_text} failed on all {len(record['attempts'])} attempts; "
                f"the best was #{best} ({a['rung']}: "
                f"{a['bpw']:.2f} bits/weight, {numbers}; "
                f"failed {'; '.join(a['failed'])})", where="--gate", fix="loosen --gate, quantize with more bits, "
                "or --gate none to keep the artifact unchecked")
        record["seconds"] = round(time.perf_counter() - start, 1)
        manifest_path = artifact / "manifest.json"
        manifest = json.loads(manifest_path.read_text())
        manifest["gate"] = record
        manifest_path.write_text(json.dumps(manifest, indent=1))
        save_results(artifact, chosen_results)
        _swap_into_place(artifact, out)
        return out, record
    finally:
        shutil.rmtree(work, ignore_errors=True)
