"""What `bitsmith report` shows, gathered from an artifact: summary, evals.json, the gate record, the Pareto front."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import is_artifact
from bitsmith.tools.suites import load_results

# The search's Pareto front, copied into the artifact by `compile --plan` (the plan's OUTPUT.pareto.json beside it)
PARETO_FILE = "pareto.json"


@dataclass
class ReportData:
    summary: dict[str, Any]  # tools/describe.describe of the artifact
    manifest: dict[str, Any]
    evals: dict[str, Any] = field(default_factory=dict)  # suite -> SuiteResult
    gate: dict[str, Any] | None = None  # manifest["gate"] (the compile-time quality gate)
    pareto: dict[str, Any] | None = None  # {"source", "chosen" (plan stats or None), "points": [...]}


def record_pareto(plan_path: str | Path, artifact: str | Path) -> Path | None:
    """Copy the search's front (PLAN.pareto.json beside a `--plan` PLAN) into the artifact as pareto.json, with
    the chosen plan's predicted stats, so the report finds it; None when the plan has no front beside it."""
    plan_path = Path(plan_path)
    front = plan_path.with_suffix(".pareto.json")
    if not front.is_file():
        return None
    points = _read_json(front, "--plan")
    chosen = _read_json(plan_path, "--plan").get("predicted")
    out = Path(artifact) / PARETO_FILE
    out.write_text(json.dumps({"source": str(front), "chosen": chosen, "points": points}, indent=1))
    return out


def load_pareto(path: str | Path) -> dict[str, Any]:
    """A front from `bitsmith search` (its OUTPUT.pareto.json: a list of points) or an artifact's pareto.json."""
    data = _read_json(Path(path), "--pareto")
    if isinstance(data, list):
        data = {"source": str(path), "chosen": None, "points": data}
    points = data.get("points") if isinstance(data, dict) else None
    if not isinstance(points, list) or not all(isinstance(p, dict) and "bytes" in p for p in points):
        raise BitsmithError(f"{path} is not a Pareto front from `bitsmith search`", where="--pareto",
                            fix="pass the OUTPUT.pareto.json that `bitsmith search -o OUTPUT` wrote")
    return data


def gather(artifact: str | Path, pareto: str | Path | None = None) -> ReportData:
    from bitsmith.tools.describe import describe  # heavy: the compiler (IR, loaders)

    artifact = Path(artifact)
    if not is_artifact(artifact):
        raise BitsmithError(f"{artifact} is not an artifact (no manifest.json)", where="report",
                            fix="pass a directory written by `bitsmith compile -o DIR`")
    summary, _ = describe(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    front = pareto if pareto is not None else (artifact / PARETO_FILE if (artifact / PARETO_FILE).is_file() else None)
    try:
        evals = load_results(artifact)
    except (json.JSONDecodeError, TypeError, AttributeError) as exc:
        raise BitsmithError(f"cannot read {artifact / 'evals.json'}: {exc}", where="report",
                            fix="delete it and run `bitsmith eval ARTIFACT --suite ...` again") from exc
    return ReportData(summary, manifest, evals, manifest.get("gate"), load_pareto(front) if front is not None else None)


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsmithError(f"cannot read {path}: {exc}", where=where, fix="pass a file `bitsmith search` wrote") from exc


def tensor_kind(name: str) -> tuple[str, str]:
    """(row, column) of a weight in the precision chart: ("layer 3", "self_attn.q_proj"); expert indices become
    "*" so a MoE layer's experts share a column; weights outside the decoder layers go in the row "model"."""
    base = re.sub(r"\.weight$", "", name)
    match = re.match(r"layers\.(\d+)\.(.+)", base)
    if match:
        return f"layer {match.group(1)}", re.sub(r"\.\d+\.", ".*.", match.group(2))
    return "model", base


def precision_grid(summary: dict[str, Any]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    """(rows, columns, cells) of the per-layer precision plan: each cell {bytes, params, bpw, label} for the
    matrices (1-D norms and biases are left out); label is the scheme (and the
    source type it was converted from), or the source type of an imported weight."""
    weights = (summary.get("precision") or {}).get("weights") or {}
    exact = (summary.get("import") or {}).get("exact") or {}
    converted = (summary.get("import") or {}).get("converted") or {}
    cells: dict[tuple[str, str], dict] = {}
    for name, row in weights.items():
        if "norm" in name or name.endswith(".bias"):
            continue
        key = tensor_kind(name)
        cell = cells.setdefault(key, {"bytes": 0, "params": 0, "labels": set()})
        cell["bytes"] += row["bytes"]
        cell["params"] += row["params"]
        label = row["scheme"] + (f" (from {converted[name]['type']})" if name in converted else "")
        cell["labels"].add(f"{exact[name]} (imported)" if name in exact else label)
    for cell in cells.values():
        cell["bpw"] = 8 * cell["bytes"] / max(cell["params"], 1)
        labels = sorted(cell.pop("labels"))
        cell["label"] = labels[0] if len(labels) == 1 else "mixed: " + ", ".join(labels)
    layer_rows = sorted({r for r, _ in cells if r != "model"}, key=lambda r: int(r.split()[1]))
    rows = layer_rows + (["model"] if any(r == "model" for r, _ in cells) else [])
    columns = sorted({c for _, c in cells}, key=_column_key)
    return rows, columns, cells


# the order a decoder layer reads its matrices in (attention, then the MLP); anything else after, by name
_ORDER = ("embed_tokens", "q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj", "gate_proj", "up_proj", "gate_up_proj",
          "down_proj", "lm_head")


def _column_key(column: str) -> tuple[int, str]:
    last = column.rsplit(".", 1)[-1]
    return (_ORDER.index(last) if last in _ORDER else len(_ORDER), column)
