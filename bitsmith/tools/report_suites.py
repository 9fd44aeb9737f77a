"""The report's eval-suite section: a metrics table per suite (artifact against the reference), its charts and its
details, read from evals.json whatever shape each suite's details take (lists of rows, tables, scalars)."""

from __future__ import annotations

import json
import math
import re
from typing import Any

from bitsmith.tools import report_plots as plots
from bitsmith.tools.report_html import esc, fmt, note, table

SHARES = ("top1", "golden", "golden_acc", "json", "json_constrained", "needle")  # metrics in [0, 1]
DEPTH_KEYS, LENGTH_KEYS = ("depth",), ("length", "ctx", "context", "tokens")
SCORE_KEYS = ("found", "correct", "ok", "hit", "accuracy", "acc", "match", "passed")


def evals_section(evals: dict[str, Any]) -> str:
    if not evals:
        return note("No eval results: run `bitsmith eval ARTIFACT --suite ppl,golden,json,needle,serve` "
                    "(it writes evals.json into the artifact).")
    parts = [overview_chart(evals)]
    for name, result in evals.items():
        parts.append(suite_block(name, result))
    return "\n".join(p for p in parts if p)


def overview_chart(evals: dict[str, Any]) -> str:
    """Every share metric of every suite in one chart, artifact beside the reference."""
    metrics = {k: v for r in evals.values() for k, v in r.metrics.items() if _number(v)}
    names = [m for m in SHARES if m in metrics]
    if len(names) < 2:  # one suite's one share is in its own table already
        return ""
    return plots.paired_bars("quality against the reference (shares: higher is better)", names,
                             [float(metrics[m]) for m in names], [_ref(metrics, m) for m in names], "share",
                             "quality metrics of every suite, artifact and reference")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def _ref(metrics: dict[str, float], name: str) -> float | None:
    """The reference's value of a metric (golden, the agreement with the reference, has none)."""
    return float(metrics[f"ref_{name}"]) if f"ref_{name}" in metrics else None


def suite_block(name: str, result: Any) -> str:
    metrics = result.metrics
    rows = []
    for key, value in metrics.items():
        if key.startswith("ref_") and key[4:] in metrics:
            continue  # shown beside its artifact value
        ref = metrics.get(f"ref_{key}")
        delta = fmt(value - ref) if _number(ref) and _number(value) else ""
        rows.append([key, fmt(value), fmt(ref) if ref is not None else "", delta])
    head = (f"<h3>{esc(name)}</h3><p class=meta>reference: {esc(result.reference or '-')} · "
            f"{fmt(result.seconds)} s</p>")
    body = [head, table(["metric", "artifact", "reference", "difference"], rows, numeric=(1, 2, 3))]
    body.append(suite_charts(name, metrics, result.details or {}))
    if result.details:
        body.append(f"<details><summary>{esc(name)} details</summary>{render_details(result.details)}</details>")
    return "<div class=suite>" + "\n".join(b for b in body if b) + "</div>"


def suite_charts(name: str, metrics: dict[str, float], details: dict[str, Any]) -> str:
    metrics = {k: v for k, v in metrics.items() if _number(v)}  # a suite may leave a value out (None)
    charts = []
    if name == "ppl" and "ppl" in metrics:
        charts.append(plots.paired_bars("perplexity", ["ppl"], [metrics["ppl"]], [metrics.get("ref_ppl")], "ppl",
                                        "perplexity, artifact and reference"))
        klds = [k for k in ("kld", "kld_p99") if k in metrics]
        if klds:
            charts.append(plots.paired_bars("KL divergence to the reference (nats/token)", klds,
                                            [metrics[k] for k in klds], [None] * len(klds), "KLD", "KL divergence"))
    categories = golden_categories(details)
    if categories:
        charts.append(plots.category_chart(categories))
    needle = needle_grids(details)
    if needle:
        charts.append(plots.heatmaps(*needle))
    levels = sorted(int(m.group(1)) for k in metrics if (m := re.fullmatch(r"tok_s_c(\d+)", k)))
    if levels:
        charts.append(plots.serve_chart(levels, [metrics[f"tok_s_c{c}"] for c in levels],
                                        [metrics.get(f"ref_tok_s_c{c}") for c in levels]))
    return "<div class=charts>" + "".join(charts) + "</div>" if charts else ""


def _row_lists(details: dict[str, Any]) -> list[list[dict]]:
    return [v for v in details.values() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]


def _score(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, float) and 0 <= value <= 1:  # ints are counts (a category's "prompts": 1), not shares
        return float(value)
    return None


def golden_categories(details: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{category: {measure: share}} from details["categories"] (already aggregated) or from per-prompt rows with a
    "category" and boolean outcomes (each outcome's share of the category's prompts)."""
    given = details.get("categories") or details.get("per_category")
    if isinstance(given, dict) and all(isinstance(v, dict) for v in given.values()):
        return {str(c): {k: float(x) for k, x in row.items() if _score(x) is not None} for c, row in given.items()}
    for rows in _row_lists(details):
        if "category" not in rows[0]:
            continue
        sums: dict[str, dict[str, list[float]]] = {}
        for row in rows:
            cat = sums.setdefault(str(row["category"]), {})
            for key, value in row.items():
                if isinstance(value, bool):  # outcomes; numbers in [0, 1] could be anything else
                    cat.setdefault(key, []).append(float(value))
        if any(sums.values()):
            return {c: {k: sum(v) / len(v) for k, v in row.items()} for c, row in sorted(sums.items())}
    return {}


def needle_grids(details: dict[str, Any]) -> tuple[dict[str, list[list[float]]], list, list] | None:
    """({panel: depth x length grid of mean scores}, depths, lengths) from rows with a depth and a length key and
    score columns (found/correct/..., and their ref_ counterparts)."""
    for rows in _row_lists(details):
        depth = next((k for k in DEPTH_KEYS if k in rows[0]), None)
        length = next((k for k in LENGTH_KEYS if k in rows[0]), None)
        if depth is None or length is None:
            continue
        scores = [k for k in rows[0] if k.removeprefix("ref_") in SCORE_KEYS and _score(rows[0][k]) is not None]
        if not scores:
            continue
        depths = sorted({r[depth] for r in rows})
        lengths = sorted({r[length] for r in rows})
        grids = {}
        for key in scores:
            cells: dict[tuple, list[float]] = {}
            for r in rows:
                if _score(r.get(key)) is not None:
                    cells.setdefault((r[depth], r[length]), []).append(_score(r[key]))
            grids[("reference: " if key.startswith("ref_") else "artifact: ") + key.removeprefix("ref_")] = [
                [sum(c) / len(c) if (c := cells.get((d, n))) else float("nan") for n in lengths] for d in depths]
        return grids, depths, lengths
    return None


def render_details(details: dict[str, Any], max_rows: int = 200) -> str:
    """Scalars as one key/value table, lists of rows and dicts of rows as tables, anything else as JSON."""
    scalars = [[k, fmt(v)] for k, v in details.items() if isinstance(v, (str, int, float, bool)) or v is None]
    parts = [table(["", ""], scalars)] if scalars else []
    for key, value in details.items():
        if isinstance(value, (str, int, float, bool)) or value is None:
            continue
        if isinstance(value, dict) and value and all(_is_rows(v) for v in value.values()):
            parts.append(render_details({f"{key}: {k}": v for k, v in value.items()}, max_rows))  # e.g. per mode
            continue
        rows: list[dict] | None = None
        if _is_rows(value):
            rows = value
        elif isinstance(value, dict) and value and all(isinstance(r, dict) for r in value.values()):
            rows = [{"": k, **r} for k, r in value.items()]
        elif isinstance(value, dict) and value and all(not isinstance(r, (dict, list)) for r in value.values()):
            rows = [{"": k, "value": r} for k, r in value.items()]
        if rows is None:
            parts.append(f"<h4>{esc(key)}</h4><pre>{esc(json.dumps(value, default=str)[:4000])}</pre>")
            continue
        columns = list(dict.fromkeys(k for r in rows for k in r))
        body = [[_cell(r.get(c)) for c in columns] for r in rows[:max_rows]]
        more = f"<p class=meta>and {len(rows) - max_rows} more rows</p>" if len(rows) > max_rows else ""
        parts.append(f"<h4>{esc(key)} ({len(rows)})</h4>" + table(columns, body) + more)
    return "\n".join(parts)


def _is_rows(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(r, dict) for r in value)


def _cell(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value  # the table right-aligns numbers
    if isinstance(value, (dict, list)):
        value = json.dumps(value, default=str)
    text = fmt(value)
    return text if len(text) <= 300 else text[:300] + "…"
