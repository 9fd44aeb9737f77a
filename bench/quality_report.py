"""bench/quality.md from bench/quality.py's report: tables grouped by scheme, the peer, and the issue's targets as ratios."""

from __future__ import annotations

from pathlib import Path

from hostinfo import host_line
from quality_peer import PEER_ROTATIONS

TARGET_SCHEMES = ("int4 per-channel", "int3 g32")  # where rotation + GPTQ must halve GPTQ's KLD (SmolLM2)


def find(rows: list[dict], method: str, rotation: str, scheme: str, kv: str = "auto",
         activations: str = "float32", clip: str = "none") -> dict | None:
    """The measured row with these settings, or None."""
    for r in rows:
        if (r["method"], r.get("rotation", "none"), r["scheme"], r.get("kv", "auto"), r.get("activations", "float32"),
                r.get("clip", "none")) == (method, rotation, scheme, kv, activations, clip) and "ppl" in r:
            return r
    return None


def _f(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _row_line(r: dict, ref_ppl: float | None, extra: tuple = ()) -> str:
    delta = f"{r['ppl'] - ref_ppl:+.3f}" if ref_ppl is not None else "–"
    method = r["method"] + (f" + clip {r['clip']}" if r.get("clip", "none") != "none" else "")
    cells = (r["scheme"], method, r.get("rotation", "none"), *extra, f"{r['ppl']:.3f}", delta,
             _f(r["kld_mean"]), _f(r["kld_p99"]), _f(r["top1_agree"]), f"{r['weight_bytes'] / 2**20:.2f}",
             r["seconds"], r["peak_rss_mib"])
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _table(rows: list[dict], ref_ppl: float | None, extra_header: tuple = (), extra=lambda r: ()) -> list[str]:
    head = ("scheme", "method", "rotation", *extra_header, "PPL", "Δppl", "mean KLD", "p99 KLD", "top-1 agree",
            "weight MiB", "compile s", "peak RSS MiB")
    align = ["---"] * (3 + len(extra_header)) + ["---:"] * 8
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    previous = None
    for r in rows:
        if previous is not None and r["scheme"] != previous:
            lines.append("| " + " | ".join([""] * len(head)) + " |")  # a blank row between schemes
        lines.append(_row_line(r, ref_ppl, extra(r)))
        previous = r["scheme"]
    return lines


def _ratio(num: dict | None, den: dict | None) -> str:
    if num is None or den is None:
        return "not measured"
    return f"{num['kld_mean']:.4f} / {den['kld_mean']:.4f} = **{num['kld_mean'] / den['kld_mean']:.2f}**"


def _listed(rows: list[dict], method: str, rotation: str, scheme: str, kv: str = "auto", clip: str = "none") -> bool:
    """Whether the grid had this row (measured or not): targets of rows never asked for are left out."""
    return any((x["method"], x.get("rotation", "none"), x["scheme"], x.get("kv", "auto"),
                x.get("activations", "float32"), x.get("clip", "none")) == (method, rotation, scheme, kv, "float32", clip)
               for x in rows)


def targets(r: dict) -> list[str]:
    """The issue's targets, each as a measured ratio of mean KLDs (a row of the grid not measured says so)."""
    rows, peers = r["rows"], r.get("peer_rows", [])
    lines = []
    for scheme in TARGET_SCHEMES:
        base = find(rows, "gptq", "none", scheme)
        lines += [f"- rotation + GPTQ halves GPTQ's KLD, {scheme}, {rot}: GPTQ+{rot} / GPTQ = "
                  f"{_ratio(find(rows, 'gptq', rot, scheme), base)} (target ≤ 0.50)"
                  for rot in ("hadamard", "learned") if _listed(rows, "gptq", rot, scheme)]
        clipped = find(rows, "gptq", "none", scheme, clip="mse")
        lines += [f"- with --clip mse on both sides, {scheme}, {rot}: GPTQ+clip+{rot} / GPTQ+clip = "
                  f"{_ratio(find(rows, 'gptq', rot, scheme, clip='mse'), clipped)}; against plain GPTQ: "
                  f"{_ratio(find(rows, 'gptq', rot, scheme, clip='mse'), base)} (target ≤ 0.50)"
                  for rot in ("hadamard", "learned") if _listed(rows, "gptq", rot, scheme, clip="mse")]
    for method, scheme in (("none", "16-bit"), ("gptq", "int4 g32")):
        base = find(rows, method, "none", scheme, kv="int8")
        lines += [f"- int4 KV + {rot} rotation vs int8 KV unrotated, weights {scheme}: "
                  f"{_ratio(find(rows, method, rot, scheme, kv='int4'), base)} (target ≤ 1.00 with rotation)"
                  for rot in ("none", "hadamard", "learned") if _listed(rows, method, rot, scheme, "int4")]
    for p in peers:
        if "kld_mean" in p:
            ours_rot = PEER_ROTATIONS.get(p["rotation"], "none")
            lines.append(f"- ours GPTQ+{ours_rot} vs peer GPTQ+{p['rotation']}, {p['scheme']}: "
                         f"{_ratio(find(rows, 'gptq', ours_rot, p['scheme']), p)} (target ≤ 1.00)")
    return ["Targets (ratios of mean KLD; lower is better):", ""] + lines + [""] if lines else []


def peer_table(r: dict) -> list[str]:
    peers = r.get("peer_rows", [])
    if not peers:
        return []
    lines = [f"Peer, same model/calibration/windows: {r.get('peer_name', 'llm-compressor')}, every Linear but "
             "lm_head, GPTQ dampening 0.01; its own reference PPL (transformers fp32) beside ours. spinquant: its "
             "SpinQuantModifier R1+R2+R4, random Hadamard; quip: QuIPModifier input rotations (online).", "",
             "| scheme | peer rotation | PPL | ref PPL | mean KLD | p99 KLD | top-1 agree | oneshot s "
             "| ours: GPTQ rotation | ours PPL | ours mean KLD |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for p in peers:
        ours_rot = PEER_ROTATIONS.get(p["rotation"], "none")
        ours = find(r["rows"], "gptq", ours_rot, p["scheme"])
        ours_cells = (ours_rot, _f(ours and ours["ppl"], 3), _f(ours and ours["kld_mean"]))
        if "ppl" not in p:
            lines.append(f"| {p['scheme']} | {p['rotation']} | not run: {p.get('error', '?')} | | | | | | "
                         + " | ".join(ours_cells) + " |")
            continue
        lines.append(f"| {p['scheme']} | {p['rotation']} | {p['ppl']:.3f} | {_f(p.get('ref_ppl'), 3)} | "
                     f"{_f(p.get('kld_mean'))} | {_f(p.get('kld_p99'))} | {_f(p.get('top1_agree'))} | "
                     f"{p.get('seconds', '–')} | " + " | ".join(ours_cells) + " |")
    return lines + [""]


def skipped(rows: list[dict]) -> list[str]:
    """Rows not measured, one line per reason."""
    by_reason: dict[str, list[str]] = {}
    for r in rows:
        if "ppl" not in r:
            reason = r.get("skipped") or r.get("error") or "not measured"
            extra = (f" kv {r['kv']}" if r.get("kv", "auto") != "auto" else "") + (
                f" act {r['activations']}" if r.get("activations", "float32") != "float32" else "")
            by_reason.setdefault(reason, []).append(f"{r['method']}/{r.get('rotation', 'none')}/{r['scheme']}{extra}")
    if not by_reason:
        return []
    return ["Not measured:", ""] + [f"- {reason}: {', '.join(names)}" for reason, names in by_reason.items()] + [""]


def model_section(r: dict) -> list[str]:
    if "rows" not in r:
        return []
    ref_ppl = r.get("ref_ppl")
    lines = [f"## {r['model']}: {r['tokens']:,} tokens of `{r['text']}`, ctx {r['ctx']}, "
             f"BOS {'prepended' if r['bos'] else 'not used'}; reference PPL {_f(ref_ppl, 3)}", "",
             f"Calibration: {r['calibration']}.", ""]
    measured = [x for x in r["rows"] if "ppl" in x]
    plain = [x for x in measured if x.get("kv", "auto") == "auto" and x.get("activations", "float32") == "float32"]
    kv = [x for x in measured if x.get("kv", "auto") != "auto" or (x["method"] == "none")]
    act = [x for x in measured if x.get("activations", "float32") != "float32"]
    plain = [x for x in plain if x["method"] != "none"]
    lines += (_table(plain, ref_ppl) if plain else ["No weight-quantized rows measured in this report."]) + [""]
    if kv:
        lines += ["KV cache (16-bit weights unless the scheme says otherwise; the reference keeps a float16 KV):", ""]
        lines += _table(kv, ref_ppl, ("KV",), lambda x: (x.get("kv", "auto").replace("auto", "float16"),)) + [""]
    if act:
        lines += ["int8 activations (scored with the int8-activation emulation of `bitsmith.tools.evaluate`):", ""]
        lines += _table(act, ref_ppl) + [""]
    return lines + peer_table(r) + targets(r) + skipped(r["rows"])


def write_markdown(report: dict, path: Path, host: dict) -> None:
    lines = ["# Quantization quality", "",
             "`python bench/quality.py` (2-core CPU; reference executor). Δppl relative to the unquantized model; "
             "KLD is KL(reference ‖ quantized) per scored token.",
             "Every linear weight is quantized (`--no-keep-default`); the tied embedding / lm_head stays 16-bit. "
             "rotation: `--rotate` (hadamard: randomized Hadamard R1 + R2 + online R4/R3; learned: Cayley-optimised).",
             "", f"- {host_line(host)}", ""]
    for r in report.values():
        lines += model_section(r)
    path.write_text("\n".join(lines) + "\n")
