"""The report's charts: matplotlib (Agg) figures as inline base64 PNG <img> tags, so the page needs no other file."""

from __future__ import annotations

import base64
import html
import io
from typing import Any

ARTIFACT_COLOR, REFERENCE_COLOR = "#3b6fb6", "#b0b0b0"
PASS_COLOR, FAIL_COLOR = "#3a9a5b", "#c8553d"


def _plt():
    import matplotlib  # heavy: matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: matplotlib

    return plt


def _img(fig, alt: str) -> str:
    plt = _plt()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96)
    plt.close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def precision_chart(rows: list[str], columns: list[str], cells: dict[tuple[str, str], dict]) -> str:
    """Layer x tensor kind, coloured by bits per weight, each cell labelled with its scheme."""
    import numpy as np

    plt = _plt()
    grid = np.full((len(rows), len(columns)), np.nan)
    for (r, c), cell in cells.items():
        grid[rows.index(r), columns.index(c)] = cell["bpw"]
    width = min(3 + 1.5 * len(columns), 15)
    fig, ax = plt.subplots(figsize=(width, 1.6 + 0.36 * max(len(rows), 3)))
    image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", cmap="viridis", vmin=2, vmax=16)
    ax.set_xticks(range(len(columns)), [c.split(".")[-1] if c.count(".") < 2 else c for c in columns],
                  rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    if len(rows) * len(columns) <= 400:  # labels stay readable up to ~40 layers x 10 kinds
        for (r, c), cell in cells.items():
            label = cell["label"].replace(" (imported)", "*").replace("-sym", "").replace("-rtn", "")
            label = label.replace(" (from ", "\n(from ")  # a converted weight: its source type below
            ax.text(columns.index(c), rows.index(r), label[:24], ha="center", va="center", fontsize=7,
                    color="white" if cell["bpw"] < 9 else "black")
    fig.colorbar(image, ax=ax, label="bits / weight", fraction=0.03)
    ax.set_title("precision plan (* = imported exactly from the source)", fontsize=9)
    fig.tight_layout()
    return _img(fig, "precision plan: layer x tensor kind coloured by bits per weight")


def paired_bars(title: str, names: list[str], artifact: list[float], reference: list[float | None],
                ylabel: str, alt: str) -> str:
    """Artifact vs reference, one pair of bars per metric (a missing reference value draws no bar)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(max(2 + 1.1 * len(names), 4.5), 10), 3.2))
    xs = range(len(names))
    ax.bar([x - 0.2 for x in xs], artifact, 0.4, label="artifact", color=ARTIFACT_COLOR)
    ref_x = [x + 0.2 for x, r in zip(xs, reference) if r is not None]
    if ref_x:
        ax.bar(ref_x, [r for r in reference if r is not None], 0.4, label="reference", color=REFERENCE_COLOR)
    for x, v in zip(xs, artifact):
        ax.text(x - 0.2, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(list(xs), names, fontsize=8)
    ax.set_xlim(-0.8, len(names) - 0.2)  # one metric stays a bar, not a block
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _img(fig, alt)


def category_chart(categories: dict[str, dict[str, float]]) -> str:
    """Golden per category: one group of bars per category, one bar per measured share."""
    plt = _plt()
    keys = sorted({k for row in categories.values() for k in row})
    fig, ax = plt.subplots(figsize=(min(3 + 0.9 * len(categories), 12), 3.2))
    width = 0.8 / max(len(keys), 1)
    for i, key in enumerate(keys):
        xs = [j + (i - (len(keys) - 1) / 2) * width for j in range(len(categories))]
        ax.bar(xs, [row.get(key, 0.0) for row in categories.values()], width, label=key)
    ax.set_xticks(range(len(categories)), list(categories), rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("share of prompts")
    ax.set_title("golden prompts per category", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    return _img(fig, "golden accuracy per category")


def heatmaps(grids: dict[str, Any], depths: list, lengths: list) -> str:
    """Needle retrieval accuracy, depth x context length, one panel per model (artifact, reference)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(grids), figsize=(1.5 + 3.2 * len(grids), 0.9 + 0.45 * len(depths) + 0.6),
                             squeeze=False)
    for ax, (title, grid) in zip(axes[0], grids.items()):
        ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)", fontsize=8)
        ax.set_ylabel("depth", fontsize=8)
        ax.set_title(title, fontsize=9)
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if grid[i][j] == grid[i][j]:  # not NaN
                    ax.text(j, i, f"{grid[i][j]:.2g}", ha="center", va="center", fontsize=8)
    fig.tight_layout()
    return _img(fig, "needle retrieval accuracy by depth and context length")


def serve_chart(levels: list[int], tok_s: list[float], ref_tok_s: list[float | None]) -> str:
    return paired_bars("serve: output tokens/s per concurrency", [f"c={c}" for c in levels], tok_s, ref_tok_s,
                       "tokens / s", "serve throughput per concurrency")


def gate_chart(attempts: list[dict], chosen: int | None) -> str:
    """Weight size per attempt, green when the gate passed, the chosen one outlined."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(min(max(2.5 + 1.2 * len(attempts), 5.5), 10), 3))
    sizes = [a.get("weight_bytes", 0) / 2**20 for a in attempts]
    colors = [PASS_COLOR if a.get("passed") else FAIL_COLOR for a in attempts]
    bars = ax.bar(range(len(attempts)), sizes, 0.6, color=colors)
    ax.set_xlim(-0.7, max(len(attempts), 2) - 0.3)
    for i, (bar, a) in enumerate(zip(bars, attempts)):
        if i == chosen:
            bar.set_edgecolor("black")
            bar.set_linewidth(2.5)
        bpw = a.get("model_bpw", a.get("bpw", 0))  # the whole model's, when recorded: a kept tensor counts
        ax.text(i, bar.get_height(), f"{bpw:.2f} bpw", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(attempts)), [f"{i}: {a.get('rung', '?')}" for i, a in enumerate(attempts)],
                  rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("weights (MiB)")
    ax.set_title("gate attempts (green: passed, red: failed, outlined: chosen)", fontsize=9)
    fig.tight_layout()
    return _img(fig, "gate attempts: weight size, pass or fail")


def sensitivity_chart(tensors: dict[str, float], shown: int = 15) -> str:
    plt = _plt()
    top = sorted(tensors.items(), key=lambda kv: -kv[1])[:shown]
    fig, ax = plt.subplots(figsize=(7, 1.4 + 0.25 * len(top)))
    ax.barh(range(len(top)), [v for _, v in top], color=ARTIFACT_COLOR)
    ax.set_yticks(range(len(top)), [n.removesuffix(".weight") for n, _ in top], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("KLD when only this tensor is quantized", fontsize=8)
    ax.set_title(f"the {len(top)} most sensitive tensors", fontsize=9)
    fig.tight_layout()
    return _img(fig, "most sensitive tensors")


def pareto_chart(points: list[dict], chosen: dict | None) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    ax.plot([p["bytes"] / 2**20 for p in points], [p["kld_pred"] for p in points], "o-", label="predicted KLD",
            color=ARTIFACT_COLOR)
    meas = [p for p in points if "kld_meas" in p]
    if meas:
        ax.plot([p["bytes"] / 2**20 for p in meas], [p["kld_meas"] for p in meas], "s", label="measured KLD",
                color=FAIL_COLOR)
    if chosen and "bytes" in chosen:
        ax.axvline(chosen["bytes"] / 2**20, color="gray", ls="--", label="chosen plan")
    ax.set_xlabel("memory (MiB: weights + KV cache + workspace)", fontsize=8)
    ax.set_ylabel("KL divergence vs 16-bit", fontsize=8)
    positive = [v for p in points for v in (p["kld_pred"], p.get("kld_meas", 0)) if v > 0]
    if positive:  # log-like, and the 16-bit end (KLD exactly 0) stays on the chart
        ax.set_yscale("symlog", linthresh=min(positive))
        ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.set_title("search: Pareto front", fontsize=9)
    fig.tight_layout()
    return _img(fig, "Pareto front of the search")


def memory_chart(parts: dict[str, int]) -> str:
    """One stacked horizontal bar: weights, KV cache, workspace (MiB)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 2.0))
    left = 0.0
    colors = ["#3b6fb6", "#e0a030", "#7f7f7f", "#9467bd"]
    for (name, value), color in zip(parts.items(), colors):
        mib = value / 2**20
        ax.barh([0], [mib], left=left, color=color, label=f"{name} {mib:.2f} MiB")
        left += mib
    ax.set_yticks([])
    ax.set_xlabel("MiB", fontsize=8)
    ax.legend(fontsize=8, ncol=len(parts), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    return _img(fig, "memory plan: weights, KV cache, workspace")
