"""`bitsmith inspect`: a summary of a model or an artifact (architecture, parameters, bytes, IR)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.ir import Module
from bitsmith.compiler.loader import load_model
from bitsmith.compiler.printer import op_histogram
from bitsmith.compiler.weight_stats import summarize
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.runtime.quant_scheme import QuantScheme
from bitsmith.runtime.artifact import is_artifact, load_artifact
from bitsmith.runtime.interleave import X16
from bitsmith.runtime.memory import serving_memory
from bitsmith.tools.experts import experts_summary, format_experts


def _module_summary(module: Module) -> dict[str, Any]:
    return {name: {"nodes": len(fn.nodes), "inputs": {n: str(t) for n, t in fn.inputs}, "ops": op_histogram(fn)}
            for name, fn in sorted(module.functions.items())}


def _scheme_name(scheme: dict | None) -> str:
    if not scheme:
        return "16-bit"
    return QuantScheme.from_json(scheme).name


def precision_summary(module: Module, table: dict[str, dict[str, int]]) -> dict[str, Any]:
    """The precision plan with bytes and bits per weight, per weight and per decoder layer."""
    plan = module.meta["precision_plan"]
    weights = {name: {"scheme": _scheme_name(plan.get(name)), "bytes": row["bytes"], "params": row["params"],
                      "bits_per_weight": round(8 * row["bytes"] / max(row["params"], 1), 3)}
               for name, row in table.items()}
    layers: dict[str, dict[str, Any]] = {}
    for name, row in weights.items():
        match = re.match(r"(layers\.\d+)\.", name)
        key = match.group(1) if match else "other"
        entry = layers.setdefault(key, {"bytes": 0, "params": 0, "schemes": set()})
        entry["bytes"] += row["bytes"]
        entry["params"] += row["params"]
        if name in plan:
            entry["schemes"].add(row["scheme"])
    for entry in layers.values():
        entry["schemes"] = sorted(entry["schemes"])
        entry["bits_per_weight"] = round(8 * entry["bytes"] / max(entry["params"], 1), 3)
    totals = summarize({k: {**v, "scheme": plan.get(k)} for k, v in table.items()})
    return {"weights": weights, "layers": layers, **totals}


DENSE_TYPES = ("F32", "F16", "BF16")  # GGUF types that are plain floats: neither exact codes nor converted


def import_summary(imported: dict[str, str], source: dict[str, Any], now: dict[str, str]) -> dict[str, Any] | None:
    """Which weights kept a pre-quantized source's codes (`imported`: name -> source type, the IR meta's
    imported_types) and which quantized source tensors were converted instead (source["weight_types"], GGUF), with
    what each is now (`now`: name -> scheme or dtype); None for a source with neither."""
    types = source.get("weight_types") or {}
    converted = {name: {"type": kind, "now": now.get(name, "?")} for name, kind in sorted(types.items())
                 if kind not in DENSE_TYPES and name not in imported}
    if not imported and not converted:
        return None
    by_type: dict[str, int] = {}
    for kind in imported.values():
        by_type[kind] = by_type.get(kind, 0) + 1
    return {"exact": dict(sorted(imported.items())), "exact_by_type": dict(sorted(by_type.items())),
            "converted": converted, "notes": list(source.get("notes") or [])}


def format_import(info: dict[str, Any], shown: int = 6) -> list[str]:
    counts = ", ".join(f"{kind} ×{n}" for kind, n in info["exact_by_type"].items()) or "none"
    lines = [f"imported exact (the source's codes, never requantized): {len(info['exact'])} weights ({counts})"]
    converted = info["converted"]
    if converted:
        items = [f"{name} ({row['type']} -> {row['now']})" for name, row in list(converted.items())[:shown]]
        more = f", and {len(converted) - shown} more" if len(converted) > shown else ""
        lines.append(f"converted (dequantized from the source type): {len(converted)}: " + ", ".join(items) + more)
    lines += [f"  note: {note}" for note in info["notes"]]
    return lines


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
        if module.meta.get("precision_plan") is not None:
            summary["precision"] = precision_summary(module, m["weights"]["table"])
        plan = module.meta.get("precision_plan") or {}
        now = {name: _scheme_name(plan[name]) if plan.get(name) else t.dtype for name, t in module.weights.items()}
        now.update({name: _scheme_name(s) for name, s in plan.items() if s})
        imported = import_summary(module.meta.get("imported_types") or {}, m["provenance"].get("source") or {}, now)
        if imported:
            summary["import"] = imported
        experts = experts_summary(module, {k: v["bytes"] for k, v in m["weights"]["table"].items()})
        if experts:
            summary["experts"] = experts
        if m.get("kernels"):
            summary["kernels"] = kernels_summary(m["kernels"], module)
        if m.get("kv_plan"):
            summary["kv_plan"] = m["kv_plan"]
        if m.get("memory_plan"):
            summary["memory_plan"] = m["memory_plan"]
        serving = serving_memory(artifact)
        if serving is not None:
            summary["serving_rss"] = serving
        return summary, module
    model = canonical_model(load_model(path))
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
    experts = experts_summary(model.module, {k: int(w.nbytes) for k, w in model.weights.items()})
    if experts:
        summary["experts"] = experts
    now = {name: f"{w.dtype} (the plan decides at compile)" for name, w in model.weights.items()}
    imported = import_summary(getattr(model, "quantized_types", {}), model.source, now)
    if imported:
        summary["import"] = imported
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
    if "precision" in summary:
        p = summary["precision"]
        q_bpw = p["quantized_bits_per_weight"]
        lines.append(f"precision plan: {p['bytes'] / 2**20:.2f} MiB, {p['bits_per_weight']:.3f} bits/weight overall"
                     + (f", {q_bpw:.3f} on the {p['quantized_parameters']:,} quantized weights" if q_bpw else ""))
        lines.append(f"  {'layer':<12} {'bytes':>12} {'bits/w':>7}  schemes")
        for layer, row in sorted(p["layers"].items(), key=lambda kv: _layer_key(kv[0])):
            lines.append(f"  {layer:<12} {row['bytes']:>12,} {row['bits_per_weight']:>7.3f}  "
                         f"{', '.join(row['schemes']) or '-'}")
    if "import" in summary:
        lines += format_import(summary["import"])
    if "experts" in summary:
        lines += format_experts(summary["experts"])
    if "kv_plan" in summary:
        kv = summary["kv_plan"]
        layer_dtypes = kv["layer_dtypes"]
        dtypes = sorted(set(layer_dtypes), key=layer_dtypes.index)
        counts = ", ".join(f"{d}: {layer_dtypes.count(d)} layers" for d in dtypes)
        lines.append(f"KV cache: {kv['num_blocks']} blocks x {kv['block_size']} tokens ({counts}), "
                     f"for {kv['concurrency']} x {kv['max_context']} tokens")
        windows = kv.get("layer_windows") or []
        if any(windows):
            by_window = {w: [i for i, x in enumerate(windows) if x == w] for w in sorted(set(windows) - {0})}
            where = ", ".join(f"window {w}: {len(ls)} layer{'s' * (len(ls) != 1)}" for w, ls in by_window.items())
            if kv.get("ring_blocks"):
                ring_bytes = sum(b for b, w in zip(kv["layer_bytes"], windows) if w)
                lines.append(f"  windowed layers ({where}): a ring of {kv['ring_blocks']} blocks per sequence for "
                             f"{kv['ring_slots']} sequences, {ring_bytes / 2**20:.2f} MiB; global layers "
                             f"{(kv['bytes'] - ring_bytes) / 2**20:.2f} MiB")
            else:
                lines.append(f"  windowed layers ({where}): full blocks (the window and a chunk span the context)")
    if "memory_plan" in summary:
        mp = summary["memory_plan"]
        lines.append("memory plan: " + " + ".join(f"{k} {mp[k] / 2**20:.1f} MiB" for k in ("weights", "kv_cache", "workspace"))
                     + f" = total {mp['total'] / 2**20:.1f} MiB")
    if "serving_rss" in summary:
        sr = summary["serving_rss"]
        lines.append(f"serving RSS (predicted, compiled executor): {sr['loaded'] / 2**20:.0f} MiB once loaded "
                     f"(runtime {sr['runtime'] / 2**20:.0f} + weights {sr['weights'] / 2**20:.0f} + workspace "
                     f"{sr['workspace'] / 2**20:.0f}), up to {sr['full'] / 2**20:.0f} MiB with the KV pool full "
                     f"(+{sr['kv_cache'] / 2**20:.0f}); no weight is read from the file after loading")
    if "kernels" in summary:
        k = summary["kernels"]
        lines.append(f"kernels: {k['library']} ({k['target']}, {k['arch']}, cpu {k['target_cpu']}), "
                     f"{k['distinct_kernels']} distinct kernels")
        if k.get("weight_dtypes"):
            read = ", ".join(f"{d} ×{n}" for d, n in sorted(k["weight_dtypes"].items()))
            widened = " (bfloat16 is widened to float32 inside the kernel)" if "bfloat16" in k["weight_dtypes"] else ""
            lines.append(f"  weights the kernels read: {read}; each in its stored dtype, nothing converted{widened}")
        for entry, info in k["schedules"].items():
            lines.append(f"  schedule {entry}: {info['rows']} rows/call, {info['calls']} calls, "
                         f"arena {info['arena_bytes'] / 2**10:.1f} KiB (without reuse {info['unplanned_bytes'] / 2**10:.1f} KiB)")
    return "\n".join(lines)


def kernels_summary(entry: dict, module: Module | None = None) -> dict:
    """Library, target, per-schedule call counts and arena sizes from the manifest's `kernels`, and (with the
    module) how many of the weights the kernels read are of each stored dtype."""
    schedules = {}
    kernels, weights = set(), set()
    for name, s in entry["schedules"].items():
        kernels |= {c[0] for c in s["calls"]}
        # an interleaved copy (name@x16...) is made at load from the stored weight: count the stored one
        weights |= {arg[1].partition(X16)[0] for c in s["calls"] for arg in c[1] if arg[0] == "weight"}
        unplanned = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for _, shape, dtype in s["buffers"].values())
        schedules[name] = {"rows": s["rows"], "calls": len(s["calls"]), "arena_bytes": s["arena_bytes"],
                           "unplanned_bytes": unplanned}
    dtypes: dict[str, int] = {}
    for weight in weights if module is not None else ():
        dtype = module.weights[weight].dtype if weight in module.weights else "?"
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    return {"library": entry["library"], "target": entry["target"], "arch": entry["arch"],
            "target_cpu": entry["target_cpu"], "distinct_kernels": len(kernels),
            "build": entry.get("build"), "schedules": schedules, "weight_dtypes": dtypes}


def _layer_key(name: str) -> tuple[int, int]:
    match = re.match(r"layers\.(\d+)", name)
    return (0, int(match.group(1))) if match else (1, 0)
