"""bench/hostinfo.py: the host record, the read-bandwidth probe, the ABAB helper and the peer build check."""

from __future__ import annotations

import sys

import pytest

from conftest import REPO_ROOT

sys.path.append(str(REPO_ROOT / "bench"))  # last: bench/kernels.py must not shadow the `kernels` package
import hostinfo  # noqa: E402


def test_host_record_names_cpu_and_flags():
    info = hostinfo.host_info(probe=False)
    model, flags = hostinfo.cpuinfo()
    assert info["cpu"] == model and info["cores"] >= 1
    assert set(info["flags"]) == {f for f in hostinfo.FLAGS if f in flags}
    assert "host: " in hostinfo.host_line(info) and "not measured" in hostinfo.host_line(info)


def test_probe_streams_from_memory():
    """A quarter GiB is 8x the largest L3 of these hosts: the probe must read it at a DRAM-like rate (more
    than 1 GB/s on anything, less than 400 GB/s: a faster figure means the loads were optimised away)."""
    try:
        run = hostinfo.measure_read_bandwidth(gib=0.25, rounds=2)
    except hostinfo.ProbeUnavailable as exc:
        pytest.skip(str(exc))
    assert 1 < run["gbs"] < 400 and run["gbs"] == max(run["rounds_gbs"])
    if hostinfo._thp_mode() in ("madvise", "always"):
        assert run["huge_mb"] > 0  # the buffer asked for huge pages before its first touch


def test_interleaved_runs_abab():
    order = []
    runs = hostinfo.interleaved({"a": lambda: order.append("a") or 1.0, "b": lambda: order.append("b") or 2.0}, 3)
    assert order == ["a", "b"] * 3 and runs == {"a": [1.0] * 3, "b": [2.0] * 3}


def test_llamacpp_build_refuses_what_cannot_run_here(tmp_path):
    assert not hostinfo.llamacpp_build(tmp_path)["runs_here"]  # no build at all
    env = tmp_path / "llamacpp.env"
    env.write_text("LLAMACPP_VERSION=0.3.36\nLLAMACPP_GGML_FLAGS=-DGGML_NATIVE=ON\nLLAMACPP_CPU_FLAGS=\n")
    assert "GGML_NATIVE" in hostinfo.llamacpp_build(tmp_path)["why"]
    env.write_text("LLAMACPP_VERSION=0.3.36\nLLAMACPP_GGML_FLAGS=-DGGML_NATIVE=OFF -DGGML_AVX2=ON\n"
                   "LLAMACPP_CPU_FLAGS=avx2 no_such_flag\nLLAMACPP_BUILD_CPU=elsewhere\n")
    build = hostinfo.llamacpp_build(tmp_path)
    assert not build["runs_here"] and "no_such_flag" in build["why"]
    env.write_text("LLAMACPP_VERSION=0.3.36\nLLAMACPP_GGML_FLAGS=-DGGML_NATIVE=OFF\nLLAMACPP_CPU_FLAGS=\n"
                   "LLAMACPP_BUILD_CPU=here\n")
    assert hostinfo.llamacpp_build(tmp_path)["runs_here"]
