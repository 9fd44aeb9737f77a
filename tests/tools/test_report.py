"""`bitsmith report`: the page of a tiny compiled artifact, with fixture evals.json + gate record and without them,
parses, holds the key numbers, has no external reference, and renders in headless Chromium (text + a non-blank
screenshot)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from bitsmith.options import CompileOptions, QuantOptions
from bitsmith.tools.report import write_report
from bitsmith.tools.report_data import record_pareto
from bitsmith.tools.report_html import fmt
from bitsmith.tools.suites import SuiteResult, save_results

OPTIONS = CompileOptions(quant=QuantOptions("rtn", 4, 32, keep_default=False, schemes=(("mlp.down_proj", "int8"),)))
KLD, TOP1, GOLDEN, TOK_S16 = 0.01234, 0.9375, 0.8125, 123.4


def fixture_evals() -> dict[str, SuiteResult]:
    """Suite results of the shapes the suites write (tools/suites/*.py): golden's per-prompt rows and aggregated
    categories, needle's depth x length cells, json's rows per mode, serve's rows per concurrency."""
    prompts = [{"id": f"g{i}", "category": cat, "first_divergence": None if i % 4 else 3, "correct": i % 2 == 0,
                "ref_correct": True, "text": f"<q{i}> & 'x'", "ref_text": "y", "tokens": 5}
               for i, cat in enumerate(["facts", "arithmetic", "format", "languages"] * 4)]
    categories = {c: {"prompts": 4, "golden": 0.75, "acc": 0.5, "ref_acc": 1.0}
                  for c in ("facts", "arithmetic", "format", "languages")}
    cells = [{"length": n, "depth": d, "acc": 0.0 if (d == 0.9 and n == 64) else 1.0, "ref_acc": 1.0,
              "answers": ["x"], "ref_answers": ["x"]} for n in (32, 64) for d in (0.1, 0.5, 0.9)]
    json_rows = {mode: [{"ok": True, "why": "", "tokens": 9, "finish": "stop", "text": "{}"}]
                 for mode in ("json", "json_constrained")}
    levels = [{"concurrency": c, "throughput_tok_s": t, "ttft_ms_median": 12.0, "itl_ms_median": 25.0}
              for c, t in ((1, 40.0), (4, 90.0), (16, TOK_S16))]
    return {
        "ppl": SuiteResult("ppl", {"ppl": 12.5, "ref_ppl": 12.25, "kld": KLD, "kld_p99": 0.2, "top1": TOP1,
                                   "ppl_increase": 12.5 / 12.25 - 1}, {"text": "built-in eval.txt", "tokens": 512},
                           1.5, "the artifact's 16-bit source"),
        "golden": SuiteResult("golden", {"golden": GOLDEN, "golden_acc": 0.5, "ref_golden_acc": 1.0,
                                         "golden_divergence_median": 3.0},
                              {"categories": categories, "prompts": prompts}, 2.0, "ref"),
        "json": SuiteResult("json", {"json": 0.75, "json_constrained": 1.0, "ref_json": 0.875,
                                     "ref_json_constrained": 1.0}, {"prompts": json_rows, "seconds": {"json": 1.0}},
                            2.5, "ref"),
        "needle": SuiteResult("needle", {"needle": 5 / 6, "ref_needle": 1.0},
                              {"lengths": [32, 64], "depths": [0.1, 0.5, 0.9], "cells": cells}, 3.0, "ref"),
        "serve": SuiteResult("serve", {"tok_s_c1": 40.0, "tok_s_c4": 90.0, "tok_s_c16": TOK_S16, "ttft_ms_c1": 12.0,
                                       "itl_ms_c1": 25.0, "ref_tok_s_c1": 30.0, "ref_tok_s_c4": 60.0,
                                       "ref_tok_s_c16": 80.0}, {"artifact": levels, "reference": levels}, 4.0, ""),
    }


def fixture_gate() -> dict:
    attempt = {"rung": "requested", "description": "int3 g32 everywhere", "schemes": {"int3-g32-sym-rtn": 14},
               "keep": [], "overrides": [], "weight_bytes": 40000, "bpw": 3.5, "model_bpw": 6.25, "metrics": {"kld": 0.3, "golden": 0.5, "kld_p99": 2.5},
               "failed": ["kld<=0.05 (got 0.3)"], "passed": False, "seconds": 1.25}
    passing = {**attempt, "rung": "int8-sensitive", "description": "int8 for the 4 most sensitive tensors",
               "schemes": {"int3-g32-sym-rtn": 10, "int8-g32-sym-rtn": 4}, "weight_bytes": 52000, "bpw": 4.75,
               "metrics": {"kld": 0.04, "golden": 0.95}, "failed": [], "passed": True}
    return {"spec": "kld<=0.05,golden>=0.9", "conditions": [{"metric": "kld", "op": "<=", "threshold": 0.05},
                                                             {"metric": "golden", "op": ">=", "threshold": 0.9}],
            "suites": {}, "reference": "source", "attempts": [attempt, passing], "chosen": 1,
            "sensitivity": {"measured_at": "int3-g32-sym-rtn",
                            "tensors": {f"layers.{i}.mlp.down_proj.weight": 0.1 / (i + 1) for i in range(2)}}}


class _Text(HTMLParser):
    """The page's visible text and every src/href, parsed strictly enough to fail on a broken tag structure."""

    def __init__(self):
        super().__init__()
        self.text, self.links, self.stack = [], [], []

    def handle_starttag(self, tag, attrs):
        if tag not in ("meta", "img", "br", "input", "link"):
            self.stack.append(tag)
        self.links += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()

    def handle_data(self, data):
        if not self.stack or self.stack[-1] not in ("style", "script"):
            self.text.append(data)


def parse(path: Path) -> _Text:
    parser = _Text()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    assert parser.stack == [], parser.stack
    assert all(link.startswith(("data:image/png;base64,", "#")) for link in parser.links), parser.links
    return parser


@pytest.fixture(scope="module")
def artifacts(tiny_artifact, tmp_path_factory):
    """(bare artifact, artifact with evals.json + a gate record + a Pareto front), copies of one tiny compile."""
    base = tmp_path_factory.mktemp("report")
    bare = Path(shutil.copytree(tiny_artifact(OPTIONS), base / "bare"))
    full = Path(shutil.copytree(bare, base / "full"))
    save_results(full, fixture_evals())
    manifest = json.loads((full / "manifest.json").read_text())
    manifest["gate"] = fixture_gate()
    (full / "manifest.json").write_text(json.dumps(manifest))
    plan = base / "plan.json"
    plan.write_text(json.dumps({"predicted": {"bytes": 300000, "bpw": 4.4, "kld_pred": 0.02, "kld_meas": 0.021}}))
    front = [{"bytes": 200000 + 50000 * i, "bpw": 3 + i, "latency_pred_ms": 1.0 + i, "kld_pred": 0.1 / (i + 1),
              **({"kld_meas": 0.11 / (i + 1)} if i % 2 == 0 else {})} for i in range(4)]
    (base / "plan.pareto.json").write_text(json.dumps(front))
    assert record_pareto(plan, full) == full / "pareto.json"
    return bare, full


def test_report_holds_the_key_numbers(artifacts, tmp_path):
    _, full = artifacts
    out = write_report(full, tmp_path / "report.html")
    text = " ".join(parse(out).text)
    manifest = json.loads((full / "manifest.json").read_text())
    for number in (fmt(KLD), fmt(TOP1), fmt(GOLDEN), fmt(TOK_S16)):
        assert number in text, number
    bpw = 8 * manifest["weights"]["bytes"] / manifest["weights"]["parameters"]
    assert f"{bpw:.3f}" in text  # overall bits per weight, as the header's card shows it
    assert f"{manifest['memory_plan']['total']:,}" in text
    assert "int4-g32-sym-rtn" in text and "int8-g32-sym-rtn" in text
    assert "kld_p99" in text.split("every metric of every attempt")[1]  # measured, not a condition
    assert "6.25" in text and "bits/weight (model)" in text  # the gate attempt's whole-model bits
    assert "layers 0-1" in text  # the two layers have the same plan: one row
    assert "kld<=0.05 (got 0.3)" in text and "int8 for the 4 most sensitive tensors" in text
    page = out.read_text()
    assert "&lt;q1&gt; &amp; &#x27;x&#x27;" in page and "<q1>" not in page  # escaped, not markup
    assert "class=none" not in out.read_text()  # every section has data: no "No ..." line
    # charts: precision, overview, ppl x2, golden categories, needle, serve, gate, sensitivity, pareto, memory
    assert out.read_text().count("data:image/png;base64,") == 11


def test_report_without_evals_says_so(artifacts, tmp_path):
    bare, _ = artifacts
    out = write_report(bare, tmp_path / "bare.html")
    text = " ".join(parse(out).text)
    assert "No eval results" in text and "No quality gate" in text and "No search front" in text
    assert "int4-g32-sym-rtn" in text  # the sections with data are still there


def test_report_cli_and_pareto_option(artifacts, tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    bare, full = artifacts
    result = CliRunner().invoke(main, ["report", str(bare), "-o", str(tmp_path / "r.html"), "--pareto",
                                       str(full / "pareto.json")])
    assert result.exit_code == 0, result.output
    assert "Pareto front" in (tmp_path / "r.html").read_text() and "No search front" not in (tmp_path / "r.html").read_text()
    result = CliRunner().invoke(main, ["report", str(tmp_path), "-o", str(tmp_path / "x.html")])
    assert result.exit_code == 2 and "not an artifact" in result.output


def _chromium() -> str:
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    if binary is None:
        pytest.skip("no chromium binary (Debian: apt-get install chromium; .ci/run installs it)")
    return binary


def test_report_renders_in_chromium(artifacts, tmp_path):
    from PIL import Image

    binary = _chromium()
    _, full = artifacts
    out = write_report(full, tmp_path / "report.html")
    flags = [binary, "--headless=new", "--disable-gpu", "--no-sandbox", "--hide-scrollbars"]
    dom = subprocess.run([*flags, "--dump-dom", out.as_uri()], check=False, capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = re.sub(r"<[^>]+>", " ", dom.stdout)
    for number in (fmt(KLD), fmt(TOP1), fmt(TOK_S16)):
        assert number in text, number
    shot = tmp_path / "shot.png"
    run = subprocess.run([*flags, f"--screenshot={shot}", "--window-size=1200,2400", out.as_uri()],
                         check=False, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (2400, 1200)
    non_white = float((pixels < 240).mean())
    assert non_white > 0.05 and pixels.std() > 20, (non_white, pixels.std())  # a blank page: ~0 and ~0


def test_pareto_files(tmp_path):
    from bitsmith.errors import BitsmithError
    from bitsmith.tools.report_data import load_pareto

    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert record_pareto(plan, tmp_path) is None  # a plan without a front beside it: nothing recorded
    front = tmp_path / "plan.pareto.json"
    front.write_text(json.dumps([{"bytes": 1, "kld_pred": 0.1}]))
    assert load_pareto(front)["points"] == [{"bytes": 1, "kld_pred": 0.1}]
    front.write_text(json.dumps({"weights": {}}))
    with pytest.raises(BitsmithError, match="not a Pareto front"):
        load_pareto(front)
