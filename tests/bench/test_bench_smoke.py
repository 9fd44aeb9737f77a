"""Every bench script runs once, in its smoke mode, as a user would start it (a subprocess), so a bench that
no longer runs fails the suite instead of rotting until someone needs its numbers.

Smoke modes use the smallest model each script allows (TinyStories-656K from ../shared/data, or kernels of
one small shape), one repetition, and skip peers that are not installed; they measure nothing worth
quoting. Each script must exit 0 and print its table and/or valid JSON that records the host.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"
TIMEOUT_S = 420  # a hard stop for a hung bench; smoke runs take 10-60 s on the 2-core machine


def run_bench(script: str, *args: str, data: Path | None = None, timeout: int = TIMEOUT_S) -> str:
    env = dict(os.environ)
    if data is not None:
        env["BITSMITH_DATA"] = str(data)
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, f"{script} {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc.stdout


def _strict(text: str) -> dict:
    """json.loads that refuses NaN / Infinity, which Python writes but JSON does not have."""
    def reject(token: str):
        raise ValueError(f"{token} is not JSON")
    return json.loads(text, parse_constant=reject)


def last_json(stdout: str) -> dict:
    """The JSON object a bench printed: all of stdout, or its last line that is one (after a table)."""
    try:
        return _strict(stdout)
    except json.JSONDecodeError:
        pass
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            return _strict(line)
    raise AssertionError(f"no JSON object in the output:\n{stdout[-2000:]}")


def check_host(record: dict) -> None:
    assert record["cpu"] and record["cores"] >= 1
    assert isinstance(record["flags"], list)


def has_table(stdout: str, header: str) -> bool:
    lines = stdout.splitlines()
    return any(line.startswith("| " + header) for line in lines) and any(line.startswith("|---") for line in lines)


def test_hostinfo_script():
    out = last_json(run_bench("hostinfo.py", "--json", "--gib", "0.25", "--rounds", "2"))
    check_host(out)
    assert "runs_here" in out["llamacpp"]


@pytest.mark.slow
def test_kernels_smoke():
    table = run_bench("kernels.py", "--smoke")
    assert has_table(table, "out x in") and "host: " in table
    out = last_json(run_bench("kernels.py", "--smoke", "--json"))
    check_host(out["host"])
    assert out["smoke"] and out["rows"] and out["rows"][0]["int4_gemv"]["gbs"] > 0


@pytest.mark.slow
def test_decode_smoke(shared_data):
    stdout = run_bench("decode.py", "--smoke", "--json", data=shared_data)
    assert has_table(stdout, "weights") and "host: " in stdout
    out = last_json(stdout)
    check_host(out["host"])
    row = out["configs"]["int4"]
    assert row["ours_tok_s"] > 0
    if out["llamacpp_build"]["runs_here"]:  # the peer is there: its interleaved runs must have happened
        assert row["llamacpp_tok_s"], row["llamacpp_error"]


@pytest.mark.slow
def test_reference_decode_smoke(shared_data):
    table = run_bench("reference_decode.py", "--smoke", data=shared_data)
    assert has_table(table, "model") and "host: " in table
    out = last_json(run_bench("reference_decode.py", "--smoke", "--json", data=shared_data))
    check_host(out["host"])
    assert out["models"]["tinystories-656k"]["ours_tok_s"] > 0


@pytest.mark.slow
def test_quality_smoke(shared_data):
    out = last_json(run_bench("quality.py", "--smoke", "--json", data=shared_data))
    check_host(out["host"])
    (row,) = out["tinystories"]["rows"]
    assert row["scheme"] == "int4 g32" and row["ppl"] > 1


@pytest.mark.slow
def test_search_smoke(shared_data):
    # four small searches since issue 20 (at the uniform and the heuristic bpw, each unrotated and rotated)
    stdout = run_bench("search.py", "--smoke", "--json", data=shared_data, timeout=1200)
    assert has_table(stdout, "model") and "host: " in stdout
    out = last_json(stdout)
    check_host(out["host"])
    assert out["tinystories"]["latency_meas_ms"] > 0


@pytest.mark.slow
def test_serve_smoke(shared_data):
    stdout = run_bench("serve.py", "--smoke", "--json", data=shared_data)
    assert has_table(stdout, "server") and "host: " in stdout
    out = last_json(stdout)
    check_host(out["host"])
    assert [r["concurrency"] for r in out["ours"]] == [1, 2]
    assert all(r["failed"] == 0 and r["tok_s"] > 0 for r in out["ours"]), out["ours"]


@pytest.mark.parametrize("script", ["gpu_check.py", "gpu_bundle.py"])
def test_gpu_scripts_parse(script):
    """The GPU scripts need a GPU (gpu_check) or minutes of CUDA builds (gpu_bundle): here they must at least
    import and parse their arguments; bench/gpu.md runs them for real."""
    assert "usage:" in run_bench(script, "--help")


@pytest.mark.slow
def test_scale_smoke(shared_data):
    """A 2-layer synthetic model through every stage: our compiles (int4, int8), the peer's convert + quantize
    when its venv exists, interleaved serving rounds, and the RSS prediction next to the measured RSS."""
    out = last_json(run_bench("scale.py", "--smoke", "--json", data=shared_data))
    check_host(out["host"])
    shape = out["shapes"]["smoke"]
    assert all(not c["rc"] and c["peak_rss_gb"] > 0 for c in shape["ours"].values())
    serving = shape["serving"]["int4"]["ours"]
    assert serving["decode_tok_s"] > 0 and serving["prefill_tok_s"] > 0
    assert serving["predicted_rss_gb"]["loaded"] <= serving["predicted_rss_gb"]["full"]
    # the prediction is of the same process: within 25% of what it measured (tiny weights: mostly the runtime)
    assert abs(serving["rss_gb"] - serving["predicted_rss_gb"]["loaded"]) < 0.25 * serving["rss_gb"]


@pytest.mark.slow
def test_compile_methods_smoke(shared_data):
    """GPTQ and AWQ on a 4-layer synthetic model: ours, and llm-compressor's on the same tokens when its venv exists."""
    out = last_json(run_bench("compile_methods.py", "--smoke", "--json", data=shared_data))
    check_host(out["host"])
    assert out["calib_samples"] == 4 and out["calib_seqlen"] == 32
    for method in ("gptq", "awq"):
        ours, peer = out["methods"][method]["ours"], out["methods"][method]["peer"]
        assert ours["rc"] == 0 and ours["seconds"] > 0 and ours["peak_rss_gb"] > 0, ours
        if out["peer"]:  # the venv is there: its run must have worked
            assert peer["rc"] == 0 and peer["phases"]["quantize_s"] >= 0, peer.get("error")
        else:
            assert "skipped" in peer


@pytest.mark.slow
def test_moe_smoke():
    """A 1-layer 2-of-8 MoE and its dense equivalent (random weights, int8), compiled and decoded interleaved."""
    stdout = run_bench("moe.py", "--smoke", "--json")
    assert has_table(stdout, "model") and "host: " in stdout
    out = last_json(stdout)
    check_host(out["host"])
    moe, dense = out["rows"]["moe"], out["rows"]["dense"]
    assert moe["tok_s"] > 0 and dense["tok_s"] > 0
    assert moe["read_mb_per_token"] < dense["read_mb_per_token"]  # only the chosen experts are read


def test_export_hf_smoke(shared_data):
    pytest.importorskip("compressed_tensors")
    out = last_json(run_bench("export_hf.py", "--smoke", "--json", data=shared_data))
    check_host(out["host"])
    row = out["rows"][0]
    # transformers runs the export to our logits; the float model is much further away than that
    assert row["compressed-tensors"]["rel"] < 2e-3 < row["float"]["rel"]
