"""A cross link that fails for want of the target's C library names the Debian package, not the kernel cache."""

from __future__ import annotations

import pytest

from bitsmith.codegen import build
from bitsmith.codegen.target import cross_target
from bitsmith.errors import BitsmithError

# What aarch64-linux-gnu-gcc prints when libc6-dev-arm64-cross is missing (gcc-aarch64-linux-gnu installed without
# recommends), as seen on this machine's Debian bookworm.
NO_CRTI = ("/usr/lib/gcc-cross/aarch64-linux-gnu/12/../../../../aarch64-linux-gnu/bin/ld: cannot find crti.o: "
           "No such file or directory\ncollect2: error: ld returned 1 exit status\n")


def fake_linker(directory, message: str):
    """An aarch64-linux-gnu-gcc on PATH that fails the way the real one does."""
    path = directory / "aarch64-linux-gnu-gcc"
    path.write_text(f"#!/bin/sh\ncat >&2 <<'END'\n{message}END\nexit 1\n")
    path.chmod(0o755)
    return directory


def test_missing_cross_libc_names_the_package(tmp_path, monkeypatch):
    bin_dir = fake_linker(tmp_path, NO_CRTI)
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    with pytest.raises(BitsmithError) as caught:
        build._build_cpu({}, cross_target("aarch64-linux"), tmp_path / "k.so", tmp_path / "cache")
    text = str(caught.value)
    assert "cannot find crti.o" in text  # the linker's own line, not TVM's "Command line: ..."
    assert "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross" in text
    assert "clear the kernel cache" not in text
    assert "Command line" not in text


def test_other_link_failures_keep_the_linker_line(tmp_path, monkeypatch):
    bin_dir = fake_linker(tmp_path, "k.o: file not recognized: file format not recognized\n"
                                    "collect2: error: ld returned 1 exit status\n")
    monkeypatch.setenv("PATH", f"{bin_dir}:{__import__('os').environ['PATH']}")
    with pytest.raises(BitsmithError) as caught:
        build._build_cpu({}, cross_target("aarch64-linux"), tmp_path / "k.so", tmp_path / "cache")
    assert "ld returned 1 exit status" in str(caught.value)
    assert "libc6-dev-arm64-cross" not in str(caught.value)
