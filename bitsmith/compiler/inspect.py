"""`bitsmith inspect`: a summary of a model or an artifact (architecture, parameters, bytes, IR)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitsmith.compiler.ir import Module
from bitsmith.compiler.printer import op_histogram
from bitsmith.runtime.artifact import is_artifact, load_artifact


def _module_summary(module: Module) -> dict[str, Any]:
    return {name: {"nodes": len(fn.nodes), "inputs": {n: str(t) for n, t in fn.inputs}, "ops": op_histogram(fn)}
            for name, fn in sorted(module.functions.items())}


def describe(path: str | Path) -> tuple[dict[str, Any], Module]:
    """(summary dict, module) for an artifact directory or any loadable model."""
    path = Path(path)
    if is_artifact(path):
        artifact = load_artifact(path, check_hashes=False)
        m = artifact.manifest
        module = Module.from_json(m["ir"])
        summary = {
            "kind": "artifact",
            "path": str(path),
            "architecture": m["model"].get("architecture", m["model"].get("model_type")),
            "parameters": m["weights"]["parameters"],
            "bytes_by_dtype": m["weights"]["bytes_by_dtype"],
            "config": m["model"],
            "tokenizer": (m["tokenizer"] or {}).get("kind"),
            "provenance": m["provenance"],
            "ir": _module_summary(module),
        }
        return summary, module
    from bitsmith.compiler.loader import load_model

    model = load_model(path)
    bytes_by_dtype: dict[str, int] = {}
    for w in model.weights.values():
        bytes_by_dtype[str(w.dtype)] = bytes_by_dtype.get(str(w.dtype), 0) + w.nbytes
    summary = {
        "kind": "model",
        "path": str(path),
        "architecture": model.config.get("architecture", model.config.get("model_type")),
        "parameters": int(sum(w.size for w in model.weights.values())),
        "bytes_by_dtype": bytes_by_dtype,
        "config": model.config,
        "tokenizer": model.tokenizer.kind if model.tokenizer else None,
        "provenance": {"source": model.source},
        "ir": _module_summary(model.module),
    }
    return summary, model.module


def format_summary(summary: dict[str, Any]) -> str:
    cfg = summary["config"]
    lines = [
        f"{summary['kind']}: {summary['path']}",
        f"architecture: {summary['architecture']}",
        f"parameters: {summary['parameters']:,}",
        "weights: " + ", ".join(f"{d} {b / 2**20:.2f} MiB" for d, b in sorted(summary["bytes_by_dtype"].items())),
    ]
    dims = [k for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                        "vocab_size", "max_position") if k in cfg]
    if dims:
        lines.append("shape: " + ", ".join(f"{k}={cfg[k]}" for k in dims))
    lines.append(f"tokenizer: {summary['tokenizer']}")
    for name, info in summary["ir"].items():
        ops = ", ".join(f"{op}×{n}" for op, n in info["ops"].items())
        lines.append(f"IR {name}: {info['nodes']} nodes ({ops})")
    return "\n".join(lines)
