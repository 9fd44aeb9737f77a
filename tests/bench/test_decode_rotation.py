"""bench/decode.py --rotation: its section of decode.md is replaced in place, and a TinyStories run (two compiles,
interleaved decode runs) reports both artifacts and their changed kernels."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"


def _decode_module():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH / "decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rotation_section_is_replaced_and_the_rest_kept(tmp_path):
    decode = _decode_module()
    path = tmp_path / "decode.md"
    path.write_text("# Decode\n\ntable\n\n## Earlier run\n\nold\n")
    decode.replace_section(path, decode.ROTATION_HEADING, f"{decode.ROTATION_HEADING}\n\nfirst\n")
    assert path.read_text() == "# Decode\n\ntable\n\n## Earlier run\n\nold\n\n## Online rotation cost\n\nfirst\n"
    path.write_text(path.read_text() + "\n## Later\n\nkept\n")
    decode.replace_section(path, decode.ROTATION_HEADING, f"{decode.ROTATION_HEADING}\n\nsecond\n")
    text = path.read_text()
    assert "first" not in text and "second" in text and text.endswith("## Later\n\nkept\n") and "old" in text


def test_rotation_run_on_tinystories(shared_data, tmp_path):  # slow: shared_data
    out = tmp_path / "decode.md"
    env = dict(os.environ, BITSMITH_DATA=str(shared_data))
    proc = subprocess.run([sys.executable, str(BENCH / "decode.py"), "--rotation", "--model",
                           str(shared_data / "tinystories-656k"), "--tokens", "4", "--rounds", "1", "--activations",
                           "float32", "--out", str(out), "--json"], capture_output=True, text=True, timeout=600,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    (row,) = report["rotation"]
    assert row["none_tok_s"] > 0 and row["hadamard_tok_s"] > 0 and row["ratio"] > 0
    # the rotated step calls the fused versions in place of silu*up and RoPE: as many calls on both sides
    assert row["none_kernel_calls"] == row["hadamard_kernel_calls"] > 0
    assert "## Online rotation cost" in out.read_text() and report["host"]["cores"] >= 1
