"""Run an aarch64 bundle on x86 under QEMU user-mode: a cached arm64 sysroot, the bundle's wheels, peak RSS."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bitsmith.errors import BitsmithError

QEMU = "qemu-aarch64-static"
MMDEBSTRAP = "mmdebstrap"
# What the runtime needs from Debian: the interpreter and its standard library, and the C++ runtime that
# libtvm_runtime.so, tokenizers and numpy link against (numpy's OpenBLAS comes inside its wheel).
SYSROOT_PACKAGES = ("python3.11-minimal", "libpython3.11-stdlib", "libstdc++6", "libgcc-s1")
SUITES = {"3.11": "bookworm"}  # the bundle's Python -> the Debian release that ships it
# QEMU's default core ("max") has every feature, so a kernel built for a newer core would pass here and crash on
# the device: always emulate the device's own core (a device profile's llvm_cpu: QEMU and LLVM share these names).
DEFAULT_CPU = "cortex-a76"


@dataclass
class EmulatedRun:
    returncode: int
    stdout: str
    stderr: str
    peak_rss: int  # bytes: the qemu process (guest memory + QEMU's own, translated code included)
    seconds: float

    def json(self) -> dict:
        """The last stdout line of `run --json` ({"text", "token_ids"})."""
        if self.returncode != 0:
            raise BitsmithError(f"the emulated run failed (exit {self.returncode}): {self.stderr.strip()[-800:]}",
                                where="emulate", fix="read the emulated process's error above")
        return json.loads(self.stdout.strip().splitlines()[-1])


def cache_dir() -> Path:
    return Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith")) / "emulate"


def missing_tools() -> str | None:
    """Why emulation cannot run here (a sentence naming the packages), or None."""
    lacking = [t for t in (QEMU, MMDEBSTRAP) if shutil.which(t) is None]
    if not lacking:
        return None
    return (f"{' and '.join(lacking)} not installed (Debian: apt-get install qemu-user-static mmdebstrap); "
            f"the arm64 sysroot needs mmdebstrap only when it is not cached in {cache_dir()}")


def sysroot(python: str = "3.11") -> Path:
    """An arm64 Debian root holding Python `python` and the C++ runtime, built once with mmdebstrap (no chroot,
    no binfmt: --variant=extract only unpacks the packages) and cached."""
    if python not in SUITES:
        raise BitsmithError(f"no Debian release known for Python {python}", where="emulate",
                            fix=f"package the bundle with Python {', '.join(SUITES)}")
    root = cache_dir() / f"sysroot-arm64-{SUITES[python]}"
    if (root / "usr" / "bin" / f"python{python}").exists():
        return root
    if shutil.which(MMDEBSTRAP) is None:
        raise BitsmithError("mmdebstrap is needed to build the arm64 sysroot", where="emulate",
                            fix="apt-get install mmdebstrap")
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)  # mmdebstrap cannot resolve a target whose parent is missing
    command = [MMDEBSTRAP, "--variant=extract", "--arch=arm64", "--include=" + ",".join(SYSROOT_PACKAGES),
               SUITES[python], str(partial)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["(no output)"])[-3:]
        raise BitsmithError(f"mmdebstrap failed: {' / '.join(tail)}", where="emulate",
                            fix="check access to a Debian mirror (or run as root: mmdebstrap's unshare mode "
                                "needs user namespaces otherwise)")
    partial.rename(root)
    return root


def bundle_info(bundle: Path) -> dict:
    path = bundle / "bundle.json"
    if not path.is_file():
        raise BitsmithError("not a bundle (no bundle.json)", where=str(bundle), fix="make one with `bitsmith package`")
    info = json.loads(path.read_text())
    if info["target"] != "aarch64-linux":
        raise BitsmithError(f"the bundle is for {info['target']}, emulation runs aarch64-linux bundles",
                            where=str(bundle), fix="bitsmith package ARTIFACT -o BUNDLE --target aarch64-linux")
    return info


def bundle_site(bundle: Path) -> Path:
    """The bundle's requirements unpacked for aarch64 into one cached directory (BUNDLE_SITE): from the bundle's
    wheels/ when it has them, else downloaded like `bitsmith package --offline` does."""
    info = bundle_info(bundle)
    pins: dict[str, str] = info["requirements"]
    from bitsmith.tools.package import _find_wheel, download_wheels, wheel_cache  # top layer: no cycle

    local = bundle / "wheels"
    wheels = {n: _find_wheel(local, n, v) for n, v in pins.items()} if local.is_dir() else {}
    if not wheels or any(w is None for w in wheels.values()):
        if info["python"] != f"{sys.version_info.major}.{sys.version_info.minor}":
            raise BitsmithError(f"the bundle is for Python {info['python']} and has no wheels/", where=str(bundle),
                                fix="package it with --offline")
        wheels = download_wheels(info["target"], pins, wheel_cache(info["target"]))
    key = hashlib.sha256(" ".join(sorted(w.name for w in wheels.values())).encode()).hexdigest()[:16]
    site = cache_dir() / f"site-{key}"
    if site.is_dir():
        return site
    partial = site.with_name(site.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for wheel in wheels.values():
        with zipfile.ZipFile(wheel) as zf:
            zf.extractall(partial)
    for data in partial.glob("*.data"):  # a wheel's purelib/platlib parts belong at the top of site-packages
        for part in ("purelib", "platlib"):
            if (data / part).is_dir():
                for item in (data / part).iterdir():
                    item.rename(partial / item.name)
    for so in partial.rglob("*.so*"):  # zip drops the executable bit; the loader does not need it, but be exact
        so.chmod(0o755)
    partial.rename(site)
    return site


def qemu_cpu(name: str) -> str:
    """QEMU's name for a core, or for a device profile's core (raspberry-pi-5 -> cortex-a76)."""
    from bitsmith.devices import device_names, device_profile

    cpu = (device_profile(name).llvm_cpu or "") if name in device_names() else name
    listed = subprocess.run([QEMU, "-cpu", "help"], capture_output=True, text=True, check=False).stdout.split()
    if cpu not in listed:
        raise BitsmithError(f"QEMU has no core {cpu!r} (for {name})", where="emulate",
                            fix=f"emulate one of {', '.join(c for c in listed if c[:1].islower())} with the same "
                                f"features or fewer")
    return cpu


def python_command(root: Path, python: str = "3.11", cpu: str = DEFAULT_CPU) -> list[str]:
    """The emulated interpreter as a command: QEMU with the device's core and the sysroot as its library prefix."""
    if shutil.which(QEMU) is None:
        raise BitsmithError(f"{QEMU} is not installed", where="emulate", fix="apt-get install qemu-user-static")
    return [QEMU, "-cpu", cpu, "-L", str(root), str(root / "usr" / "bin" / f"python{python}")]


def bundle_env(bundle: Path, cpu: str = DEFAULT_CPU) -> dict[str, str]:
    """The environment under which the bundle's own launchers (run, serve) run emulated."""
    info = bundle_info(bundle)
    command = python_command(sysroot(info["python"]), info["python"], cpu)
    if any(" " in part for part in command):  # the launcher leaves $PYTHON unquoted to split it
        raise BitsmithError("the emulation cache path holds a space", where=str(cache_dir()),
                            fix="set BITSMITH_CACHE to a path without spaces")
    return dict(os.environ, PYTHON=" ".join(command), BUNDLE_SITE=str(bundle_site(bundle)))


def _hwm(pid: int) -> int:
    """VmHWM of a live process in bytes (0 once it has exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:  # gone between wait4 and here
        return 0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) * 1024 if found else 0


def _wait(process: subprocess.Popen, timeout: float) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of the child. The peak is VmHWM read while it runs, not wait4's
    ru_maxrss: that one keeps the forked parent's resident pages (a 500 MB pytest) across the exec."""
    deadline = time.monotonic() + timeout
    peak = 0
    while True:
        peak = max(peak, _hwm(process.pid))  # the high-water mark only grows: the last read before exit is ~all
        pid, status, _ = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, peak
        if time.monotonic() > deadline:
            process.kill()
            os.wait4(process.pid, 0)
            process.returncode = -9
            raise BitsmithError(f"the emulated process ran past {timeout:.0f} s", where="emulate",
                                fix="fewer tokens, or a longer timeout")
        time.sleep(0.1)


def run_bundle(bundle: Path, args: list[str], cpu: str = DEFAULT_CPU, timeout: float = 900) -> EmulatedRun:
    """`BUNDLE/run ARGS...` under emulation, with its output and peak RSS."""
    env = bundle_env(bundle, cpu)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        start = time.monotonic()
        process = subprocess.Popen([str(bundle / "run"), *args], stdout=out, stderr=err, env=env)
        code, rss = _wait(process, timeout)
        seconds = time.monotonic() - start
        out.seek(0)
        err.seek(0)
        return EmulatedRun(code, out.read(), err.read(), rss, seconds)


class EmulatedServer:
    """`BUNDLE/serve` under emulation on a free port; `with` it, then read `url`; `stop()` gives its peak RSS."""

    def __init__(self, bundle: Path, cpu: str = DEFAULT_CPU, start_timeout: float = 600):
        self.bundle, self.cpu, self.start_timeout = bundle, cpu, start_timeout
        self.url = ""
        self.peak_rss = 0
        self.log = ""

    def __enter__(self) -> Self:
        env = bundle_env(self.bundle, self.cpu)
        self._err = tempfile.NamedTemporaryFile("w+", suffix=".log")  # closed in stop()
        self.process = subprocess.Popen([str(self.bundle / "serve"), "--port", "0"], stdout=subprocess.DEVNULL,
                                        stderr=self._err, env=env)
        deadline = time.monotonic() + self.start_timeout
        while not self.url:  # the runtime prints "serving NAME on http://HOST:PORT" once it listens
            found = re.search(r"serving .* on (http://\S+)", Path(self._err.name).read_text())
            if found:
                self.url = found.group(1)
            elif self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise BitsmithError(f"the emulated server did not start: {self.log.strip()[-800:]}", where="emulate",
                                    fix="run BUNDLE/serve with the same PYTHON to see why")
            else:
                time.sleep(0.5)
        return self

    def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                _, self.peak_rss = _wait(self.process, 60)
            except BitsmithError:
                self.peak_rss = 0
        self.log = Path(self._err.name).read_text()
        self._err.close()
        return self.peak_rss

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    top = argparse.ArgumentParser(
        prog="python -m bitsmith.tools.emulate",
        description="Run an aarch64 bundle (bitsmith package --target aarch64-linux) here under QEMU user-mode "
                    "emulation. `env BUNDLE` prints PYTHON and BUNDLE_SITE for the bundle's own launchers; "
                    "`run BUNDLE -- ARGS` runs BUNDLE/run ARGS and reports its peak RSS.")
    top.add_argument("command", choices=("env", "run"))
    top.add_argument("bundle", type=Path)
    top.add_argument("--cpu", default=DEFAULT_CPU,
                     help=f"QEMU's core, or a device profile's name (raspberry-pi-5, ...); default {DEFAULT_CPU}")
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)  # after --: BUNDLE/run's own arguments
    args = top.parse_args(argv[:split])
    rest = argv[split + 1:]
    try:
        cpu = qemu_cpu(args.cpu)
        if args.command == "env":
            env = bundle_env(args.bundle, cpu)
            print(f"export PYTHON='{env['PYTHON']}' BUNDLE_SITE='{env['BUNDLE_SITE']}'")
            return 0
        result = run_bundle(args.bundle, rest, cpu)
    except BitsmithError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    print(f"emulated {cpu}: exit {result.returncode}, {result.seconds:.1f} s, peak RSS "
          f"{result.peak_rss / 2**20:.0f} MiB", file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
