"""The compile-time quality gate: parse `--gate "kld<=0.05,golden>=0.9"`, run the suites it needs, check it."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bitsmith.errors import BitsmithError
from bitsmith.options import GateOptions
from bitsmith.tools.suites import SuiteOptions, SuiteResult, run_suites

# Quick enough for every quantizing compile (measured in bench/gate.md: the default SmolLM2 job), strict enough
# that a broken quantization fails it: on SmolLM2 GPTQ int4 g32 has KLD 0.12 and top-1 0.80, int3 g32 0.65 / 0.58
# (bench/eval.md). No golden term by default: greedy exact match is 0.6 for int8 and 0.1 for int4 g32 on 20
# prompts, and on a quick gate's 8 prompts one near-tie moves it by 0.125, so it would send sound int8/int4 plans
# down the ladder; ask for it with --gate.
DEFAULT_GATE = "kld<=0.2,top1>=0.75"

# metric -> the suite that measures it (tools/suites/__init__.py lists them); serve metrics carry their level
METRICS: dict[str, str] = {
    **dict.fromkeys(("kld", "kld_p99", "top1", "ppl", "ref_ppl", "ppl_increase"), "ppl"),
    **dict.fromkeys(("golden", "golden_acc", "ref_golden_acc", "golden_divergence_median"), "golden"),
    **dict.fromkeys(("json", "json_constrained", "ref_json", "ref_json_constrained"), "json"),
    **dict.fromkeys(("needle", "ref_needle"), "needle"),
}
SERVE_METRIC = re.compile(r"(ref_)?(tok_s|ttft_ms|itl_ms)_c(\d+)")
SUITE_ORDER = ("ppl", "golden", "json", "needle", "serve")  # cheapest first
CONDITION = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(<=|>=)\s*([-+0-9.eE]+)\s*$")


@dataclass(frozen=True)
class GateCondition:
    metric: str
    op: str  # "<=" | ">="
    threshold: float

    @property
    def suite(self) -> str:
        return "serve" if SERVE_METRIC.fullmatch(self.metric) else METRICS[self.metric]

    def holds(self, value: float) -> bool:
        return value <= self.threshold if self.op == "<=" else value >= self.threshold

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def to_json(self) -> dict:
        return {"metric": self.metric, "op": self.op, "threshold": self.threshold}


def parse_gate(spec: str | None) -> tuple[GateCondition, ...]:
    """`metric<=x,metric>=y,...` -> conditions; None, "" and "none" -> () (no gate); "default" -> DEFAULT_GATE."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return ()
    if spec.strip().lower() == "default":
        spec = DEFAULT_GATE
    names = ", ".join([*METRICS, "tok_s_cN", "ttft_ms_cN", "itl_ms_cN"])
    conditions = []
    for part in spec.split(","):
        m = CONDITION.match(part)
        if m is None:
            raise BitsmithError(f"gate condition {part.strip()!r} is not METRIC<=NUMBER or METRIC>=NUMBER",
                                where="--gate", fix=f"write e.g. 'kld<=0.05,golden>=0.9'; metrics: {names}")
        metric, op, value = m.groups()
        if metric not in METRICS and not SERVE_METRIC.fullmatch(metric):
            raise BitsmithError(f"unknown gate metric {metric!r}", where="--gate", fix=f"use one of {names}")
        try:
            threshold = float(value)
        except ValueError:
            raise BitsmithError(f"gate threshold {value!r} of {metric} is not a number", where="--gate",
                                fix="write e.g. 'kld<=0.05'") from None
        conditions.append(GateCondition(metric, op, threshold))
    return tuple(conditions)


def gate_suites(conditions: tuple[GateCondition, ...]) -> list[str]:
    """The suites the conditions read, cheapest first."""
    wanted = {c.suite for c in conditions}
    return [s for s in SUITE_ORDER if s in wanted]


def suite_options(gate: GateOptions, conditions: tuple[GateCondition, ...], executor: str = "compiled") -> SuiteOptions:
    """The quick suites a gate runs (GateOptions' limits), the serve levels its conditions name."""
    levels = sorted({int(m.group(3)) for c in conditions if (m := SERVE_METRIC.fullmatch(c.metric))})
    return SuiteOptions(tokens=gate.tokens, limit=gate.limit, max_tokens=gate.max_tokens,
                        concurrency=tuple(levels) or (1,), executor=executor)


@dataclass
class GateCheck:
    metrics: dict[str, float]
    failed: list[str]  # "golden>=0.9 (got 0.82)"
    results: dict[str, SuiteResult]
    seconds: float

    @property
    def passed(self) -> bool:
        return not self.failed


def check_gate(artifact: str | Path, conditions: tuple[GateCondition, ...], options: SuiteOptions,
               reference: str | Path | None = None, log: Callable[[str], None] | None = None) -> GateCheck:
    """Run the suites the conditions need on `artifact` (against `reference`, default its source) and check them."""
    start = time.perf_counter()
    results = run_suites(artifact, gate_suites(conditions), reference, options, log)
    metrics = {k: float(v) for r in results.values() for k, v in r.metrics.items()}
    failed = []
    for c in conditions:
        if c.metric not in metrics:
            raise BitsmithError(f"suite {c.suite} did not report {c.metric}", where="--gate",
                                fix="drop the condition or report the suite's bug")
        if not c.holds(metrics[c.metric]):
            failed.append(f"{c} (got {metrics[c.metric]:.4g})")
    return GateCheck(metrics, failed, results, time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- what is printed
def artifact_size(path: str | Path) -> dict[str, float]:
    """Bytes on disk, weight bytes, and bits per weight: whole model and the quantized linears (scales and zeros
    included); quantized_bpw is None when nothing is quantized."""
    path = Path(path)
    manifest = json.loads((path / "manifest.json").read_text())
    weights = manifest["weights"]
    plan = manifest["ir"].get("meta", {}).get("precision_plan") or {}
    quant = [row for name, row in weights["table"].items() if plan.get(name)]
    q_params = sum(r["params"] for r in quant)
    return {"disk_bytes": sum(p.stat().st_size for p in path.rglob("*") if p.is_file()),
            "weight_bytes": weights["bytes"], "bpw": weights["bits_per_weight"],
            "quantized_bpw": 8 * sum(r["bytes"] for r in quant) / q_params if q_params else None,
            "quantized_share": q_params / max(weights["parameters"], 1)}


def format_size(path: str | Path) -> str:
    s = artifact_size(path)
    quant = (f"quantized linears {s['quantized_bpw']:.2f} bits/weight ({100 * s['quantized_share']:.0f}% of the "
             f"weights, scales and zeros included), " if s["quantized_bpw"] else "nothing quantized, ")
    return (f"size {s['disk_bytes'] / 1e6:.1f} MB on disk (weights {s['weight_bytes'] / 1e6:.1f} MB); "
            f"{quant}whole model {s['bpw']:.2f} bits/weight")


def format_attempts(gate: dict) -> str:
    """The gate record's attempts as a table: attempt, rung, bits/weight of the quantized linears and of the whole
    model (a tensor kept 16-bit leaves the first alone), weight MB, each condition's metric, seconds, pass/fail."""
    metrics = list(dict.fromkeys(c["metric"] for c in gate["conditions"]))
    head = ["#", "rung", "bpw", "model bpw", "MB", *metrics, "s", "result"]
    rows = []
    for i, a in enumerate(gate["attempts"]):
        values = [f"{a['metrics'][m]:.4g}" if m in a["metrics"] else "-" for m in metrics]
        mark = "PASS" if a["passed"] else "fail"
        if gate.get("chosen") == i:
            mark += " (chosen)"
        rows.append([str(i), a["rung"], f"{a['bpw']:.2f}", f"{a.get('model_bpw', a['bpw']):.2f}",
                     f"{a['weight_bytes'] / 1e6:.1f}", *values,
                     f"{a['seconds']:.0f}", mark])
    widths = [max(len(r[k]) for r in [head, *rows]) for k in range(len(head))]
    line = lambda r: "  ".join(v.ljust(w) if k < 2 else v.rjust(w) for k, (v, w) in enumerate(zip(r, widths)))
    return "\n".join([f"gate {gate['spec']}:", line(head), *map(line, rows)])
