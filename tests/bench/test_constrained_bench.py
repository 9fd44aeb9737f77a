"""bench/constrained.py runs in its smoke mode: schema-constrained and plain streams of the same fixed length."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO_ROOT


def test_constrained_bench_smoke(shared_data):
    pytest.importorskip("llguidance")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "constrained.py"), "--smoke", "--json"],
                          capture_output=True, text=True, timeout=420, cwd=REPO_ROOT,
                          env={**os.environ, "BITSMITH_DATA": str(shared_data)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["host"]["cpu"] and report["load_before"]
    for level in ("1", "2"):
        row = report["throughput"][level]
        # every request, constrained or not, ran to max_tokens: the two modes did the same work
        assert row["short"] == 0
        assert row["plain"]["tok_s"] > 0 and row["schema"]["tok_s"] > 0 and row["cost"] > 0
