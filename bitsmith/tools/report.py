"""`bitsmith report`: one self-contained HTML page about an artifact (plan, search, evals, gate, memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitsmith.tools import report_plots as plots
from bitsmith.tools.report_data import ReportData, gather, precision_grid
from bitsmith.tools.report_html import (
    Markup,
    cards,
    esc,
    fmt,
    mib,
    note,
    page,
    section,
    table,
)
from bitsmith.tools.report_suites import evals_section


def write_report(artifact: str | Path, output: str | Path, pareto: str | Path | None = None) -> Path:
    """Gather everything about ARTIFACT and write the page to OUTPUT; returns OUTPUT."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(render(gather(artifact, pareto)), encoding="utf-8")
    return output


def render(data: ReportData) -> str:
    s = data.summary
    sections = [
        header(data),
        section("plan", "Precision plan", precision_section(s)),
        section("search", "Search: Pareto front", pareto_section(data.pareto)),
        section("evals", "Eval suites against the reference", evals_section(data.evals)),
        section("gate", "Quality gate", gate_section(data.gate)),
        section("memory", "Memory plan", memory_section(s)),
        section("kv", "KV cache plan", kv_section(s.get("kv_plan"))),
    ]
    return page(f"bitsmith report: {s['path']}", "\n".join(sections))


def _flatten(prefix: str, value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, dict):
        return [kv for k, v in value.items() for kv in _flatten(f"{prefix}.{k}" if prefix else k, v)]
    if isinstance(value, list):
        return [(prefix, ", ".join(fmt(x) if not isinstance(x, list) else "=".join(map(str, x)) for x in value)
                 or "-")]
    return [(prefix, value)]


def header(data: ReportData) -> str:
    s, m = data.summary, data.manifest
    source = (s.get("provenance") or {}).get("source") or {}
    kernels = s.get("kernels")
    precision = s.get("precision") or {}
    bpw = precision.get("bits_per_weight", m["weights"].get("bits_per_weight"))
    files = sum(f.get("bytes", 0) for f in (m.get("files") or {}).values())
    gate = data.gate or {}
    chosen = gate.get("chosen")
    attempts = gate.get("attempts") or []
    passed = isinstance(chosen, int) and 0 <= chosen < len(attempts) and attempts[chosen].get("passed")
    gate_text = "no gate" if not gate else f"{'passed' if passed else 'failed'} ({gate.get('spec', '')})"
    items = [("model", str(s.get("architecture"))), ("parameters", fmt(s["parameters"])),
             ("weights", mib(m["weights"]["bytes"])), ("bits per weight", f"{bpw:.3f}" if bpw is not None else "-"),
             ("artifact files", mib(files)),
             ("target", f"{kernels['target']} {kernels['arch']}" if kernels else "no kernels"), ("gate", gate_text)]
    cfg = s.get("config") or {}
    dims = ", ".join(f"{k}={cfg[k]}" for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads",
                                                "num_kv_heads", "head_dim", "vocab_size", "max_position") if k in cfg)
    prov = s.get("provenance") or {}
    lines = [f"<h1>bitsmith report: {esc(Path(s['path']).name)}</h1>",
             (f"<p class=meta>artifact {esc(s['path'])} · source {esc(source.get('path', '?'))} "
              f"({esc(source.get('format', '?'))}) · bitsmith {esc(prov.get('bitsmith_version', '?'))}, "
              f"TVM {esc(prov.get('tvm_version', '?'))} · created {esc(prov.get('created', '?'))}</p>"),
             cards(items), f"<p class=meta>shape: {esc(dims)}</p>" if dims else ""]
    if kernels:
        lines.append(f"<p class=meta>kernels: {esc(kernels['library'])} ({esc(kernels['target'])}, "
                     f"{esc(kernels['arch'])}, cpu {esc(kernels['target_cpu'])}), "
                     f"{kernels['distinct_kernels']} distinct kernels</p>")
    options = _flatten("", m.get("compile") or {})
    lines.append("<details><summary>compile options</summary>" + table(["option", "value"], options) + "</details>")
    return "\n".join(lines)


def precision_section(s: dict[str, Any]) -> str:
    precision = s.get("precision")
    if not precision:
        return note("No precision plan: every weight keeps its stored dtype (compiled without quantization).")
    q = precision.get("quantized_bits_per_weight")
    parts = [f"<p>{mib(precision['bytes'])} of weights, {precision['bits_per_weight']:.3f} bits per weight overall"
             + (f"; {q:.3f} on the {precision['quantized_parameters']:,} quantized weights" if q else "") + ".</p>"]
    imported = s.get("import")
    if imported:
        counts = ", ".join(f"{kind} ×{n}" for kind, n in imported["exact_by_type"].items()) or "none"
        parts.append(f"<p>Imported exactly from the source (its codes, never requantized): {len(imported['exact'])} "
                     f"weights ({esc(counts)}); converted from a quantized source type: "
                     f"{len(imported['converted'])}.</p>")
    rows, columns, cells = precision_grid(s)
    if cells:
        parts.append(plots.precision_chart(rows, columns, cells))
    parts.append(table(["layers", "bytes (each)", "bits/weight", "schemes"], layer_runs(precision["layers"]),
                       numeric=(1, 2)))
    exact = (imported or {}).get("exact") or {}
    per_tensor = [[name, row["scheme"], exact.get(name, ""), row["params"], row["bytes"], f"{row['bits_per_weight']:.3f}"]
                  for name, row in precision["weights"].items()]
    parts.append("<details><summary>every tensor</summary>" + table(
        ["tensor", "scheme", "imported type", "params", "bytes", "bits/weight"], per_tensor, numeric=(3, 4, 5))
        + "</details>")
    return "\n".join(parts)


def layer_runs(layers: dict[str, dict]) -> list[list[Any]]:
    """Per-layer rows, consecutive layers with the same bytes and schemes folded into one ("layers 2-29")."""
    ordered = sorted(layers.items(), key=lambda kv: (kv[0] == "other", _layer_index(kv[0])))
    runs: list[list[Any]] = []  # [first, last, row]
    for name, row in ordered:
        key = (row["bytes"], tuple(row["schemes"]))
        if runs and name != "other" and runs[-1][1] != "other" and runs[-1][3] == key:
            runs[-1][1] = name
        else:
            runs.append([name, name, row, key])
    out = []
    for first, last, row, _ in runs:
        label = first if first == last else f"layers {_layer_index(first)}-{_layer_index(last)}"
        label = "outside the layers (embeddings, lm_head, final norm)" if label == "other" else label
        out.append([label, row["bytes"], f"{row['bits_per_weight']:.3f}", ", ".join(row["schemes"]) or "16-bit"])
    return out


def _layer_index(name: str) -> int:
    tail = name.rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def pareto_section(pareto: dict[str, Any] | None) -> str:
    if not pareto or not pareto.get("points"):
        return note("No search front: the artifact was not compiled from a `bitsmith search` plan "
                    "(`compile --plan PLAN` records PLAN.pareto.json; `report --pareto FILE` reads one).")
    points, chosen = pareto["points"], pareto.get("chosen")
    rows = [[p["bytes"] / 2**20, p.get("bpw"), p.get("latency_pred_ms"), p.get("kld_pred"), p.get("kld_meas")]
            for p in points]
    parts = [f"<p class=meta>from {esc(pareto.get('source', '?'))}</p>", plots.pareto_chart(points, chosen),
             table(["MiB", "bits/weight", "latency ms (predicted)", "KLD predicted", "KLD measured"], rows,
                   numeric=(0, 1, 2, 3, 4))]
    if chosen:
        parts.append(f"<p>chosen plan: {mib(chosen.get('bytes', 0))}, {fmt(chosen.get('bpw'))} bits/weight, "
                     f"KLD predicted {fmt(chosen.get('kld_pred'))}, measured {fmt(chosen.get('kld_meas'))}.</p>")
    return "\n".join(parts)


def gate_section(gate: dict[str, Any] | None) -> str:
    if not gate:
        return note("No quality gate: compiled without --gate.")
    attempts, chosen = gate.get("attempts") or [], gate.get("chosen")
    conditions = ", ".join(f"{c['metric']} {c['op']} {fmt(c['threshold'])}" for c in gate.get("conditions") or [])
    outcome = (Markup(f"<span class=pass>passed</span> with attempt {chosen}") if chosen is not None
               else Markup("<span class=fail>no attempt passed</span>"))
    parts = [(f"<p>gate <code>{esc(gate.get('spec', ''))}</code> ({esc(conditions)}): {outcome}; "
              f"reference {esc(gate.get('reference', '-'))}; {len(attempts)} attempt(s).</p>")]
    if attempts:
        parts.append(plots.gate_chart(attempts, chosen))
        # the conditions' metrics as columns; every metric an attempt measured in the table below
        names = list(dict.fromkeys(c["metric"] for c in gate.get("conditions") or []))
        whole = any("model_bpw" in a for a in attempts)  # bpw: the quantized linears; model_bpw: every weight
        rows, classes = [], []
        for i, a in enumerate(attempts):
            verdict = Markup('<span class=pass>pass</span>' if a.get("passed") else '<span class=fail>fail</span>')
            schemes = ", ".join(f"{k} ×{v}" for k, v in (a.get("schemes") or {}).items())
            rows.append([i, a.get("rung", ""), a.get("description", ""), schemes, a.get("weight_bytes"),
                         a.get("bpw"), *([a.get("model_bpw")] if whole else []),
                         *[(a.get("metrics") or {}).get(n) for n in names], verdict,
                         "; ".join(a.get("failed") or []), a.get("seconds"), "chosen" if i == chosen else ""])
            classes.append("chosen" if i == chosen else "")
        bpw_heads = ["bits/weight (quantized)", "bits/weight (model)"] if whole else ["bits/weight"]
        parts.append(table(["#", "rung", "what changed", "schemes", "weight bytes", *bpw_heads, *names,
                            "gate", "failed conditions", "seconds", ""], rows, row_class=classes))
        measured = list(dict.fromkeys(k for a in attempts for k in (a.get("metrics") or {})))
        parts.append("<details><summary>every metric of every attempt</summary>" + table(
            ["metric", *[f"#{i}" for i in range(len(attempts))]],
            [[m, *[(a.get("metrics") or {}).get(m) for a in attempts]] for m in measured]) + "</details>")
    sens = gate.get("sensitivity") or {}
    if sens.get("tensors"):
        parts.append(f"<p class=meta>sensitivity measured at {esc(sens.get('measured_at', '?'))}</p>"
                     + plots.sensitivity_chart(sens["tensors"]))
    return "\n".join(parts)


def memory_section(s: dict[str, Any]) -> str:
    plan = s.get("memory_plan")
    if not plan:
        return note("No memory plan in the manifest (compiled without a KV plan).")
    parts = [plots.memory_chart({k: plan[k] for k in ("weights", "kv_cache", "workspace") if k in plan}),
             table(["part", "bytes", "MiB"], [[k, v, f"{v / 2**20:.2f}"] for k, v in plan.items()], numeric=(1, 2))]
    rss = s.get("serving_rss")
    if rss:
        parts.append(f"<p>Serving RSS (predicted, compiled executor): {mib(rss['loaded'])} once loaded (runtime "
                     f"{mib(rss['runtime'])} + weights {mib(rss['weights'])} + workspace {mib(rss['workspace'])}), "
                     f"up to {mib(rss['full'])} with the KV pool full.</p>")
    return "\n".join(parts)


def kv_section(kv: dict[str, Any] | None) -> str:
    if not kv:
        return note("No KV cache plan in the manifest.")
    dtypes = kv.get("layer_dtypes") or []
    counts = ", ".join(f"{d} ×{dtypes.count(d)}" for d in dict.fromkeys(dtypes))
    rows = [["block size (tokens)", kv.get("block_size")], ["blocks", kv.get("num_blocks")],
            ["blocks per sequence (max)", kv.get("max_blocks")],
            ["sequences x context", f"{kv.get('concurrency')} x {kv.get('max_context')}"],
            ["layer dtypes", counts], ["KV heads x head dim", f"{kv.get('kv_heads')} x {kv.get('head_dim')}"],
            ["bytes", f"{kv.get('bytes', 0):,} ({mib(kv.get('bytes', 0))})"]]
    windowed = sum(1 for w in kv.get("layer_windows") or [] if w)
    if windowed:
        ring = f"ring blocks {kv.get('ring_blocks')}, slots {kv.get('ring_slots')}"
        rows.append(["windowed layers", f"{windowed} ({ring})"])
    return table(["", ""], rows) + f"<p class=meta>{esc(kv.get('layout', ''))}</p>"
