"""What every bench records about the host it ran on, and the helpers for measuring against a peer.

The processor behind this machine kind changes between sessions (AMD Zen 4 one day, an Intel Xeon with
AMX another), and the machine is shared and drifts, so a number means little without the host it came
from and a bandwidth measured in the same run. Import from any bench script (they put bench/ on
sys.path):

    from hostinfo import host_info, host_line, read_bandwidth_gbs, interleaved, llamacpp_build

    host = host_info()          # dict: cpu, cores, flags, thp, mem_gib, read_bandwidth_gbs, probe, ...
    print(host_line(host))      # one line for a table's header
    report["host"] = host       # and the same dict in --json output

    python bench/hostinfo.py [--json] [--gib 1] [--rounds 5]

read_bandwidth_gbs(): a streaming read (bench/read_probe.c: widest vector loads, 8 accumulators) over a
1 GiB buffer on transparent huge pages, with as many threads as the process may use, best of several
rounds. Compiled with the system C compiler and -march=native at first use, cached under
~/.cache/bitsmith/read-probe/ keyed by source, compiler and host CPU (a binary built for one host's
flags must not run on another); None where no C compiler exists.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping

HERE = Path(__file__).resolve().parent
PROBE_SOURCE = HERE / "read_probe.c"
CACHE = Path(os.environ.get("BITSMITH_CACHE", Path.home() / ".cache" / "bitsmith")) / "read-probe"
LLAMACPP_VENV = Path(os.environ.get("BITSMITH_LLAMACPP_VENV", Path.home() / ".cache" / "bitsmith" / "llamacpp-venv"))

# /proc/cpuinfo flags that decide which kernels run (ours and the peers'): vector width, int8 dot
# products (VNNI), bf16 arithmetic, AMX tiles
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
         "amx_tile", "amx_int8", "amx_bf16")


def cpuinfo() -> tuple[str, set[str]]:
    """(model name, every flag) of the first processor in /proc/cpuinfo; ("unknown", set()) elsewhere."""
    model, flags = None, None
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model is None:
            model = value.strip()
        elif key == "flags" and flags is None:
            flags = set(value.split())
    model, flags = model or platform.processor() or "unknown", flags or set()
    return model, flags


def cores() -> int:
    """CPUs this process may run on (what the benches use as their thread count)."""
    return len(os.sched_getaffinity(0))


def _thp_mode() -> str | None:
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    return next((w.strip("[]") for w in text.split() if w.startswith("[")), None)


def _mem_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------------------------------
# the read-bandwidth probe


class ProbeUnavailable(RuntimeError):
    """The probe cannot be built or run here; the message says why."""


def probe_library() -> Path:
    """The compiled probe (compiling it on first use for this source, compiler and host CPU)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise ProbeUnavailable("no C compiler (cc/gcc) to build bench/read_probe.c")
    model, flags = cpuinfo()
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[:1]
    key = hashlib.sha256(PROBE_SOURCE.read_bytes())
    key.update(repr((cc, version, model, sorted(flags))).encode())
    out = CACHE / key.hexdigest()[:16] / "read_probe.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"  # two benches may compile at once
    cmd = [cc, "-O3", "-march=native", "-shared", "-fPIC", "-std=gnu11", str(PROBE_SOURCE), "-o", tmp, "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ProbeUnavailable(f"compiling {PROBE_SOURCE.name} failed: {proc.stderr.strip()[-400:]}")
    os.replace(tmp, out)
    return out


class ReadProbe:
    """A probe buffer kept mapped, so rounds can be measured between other work (bench/kernels.py runs one
    in every round of its interleaved repetitions: the bandwidth "alongside" each kernel).

        with ReadProbe(gib=0.25) as probe:
            gbs = probe.round()
    """

    def __init__(self, gib: float = 1.0, threads: int | None = None, huge: bool = True):
        lib = ctypes.CDLL(str(probe_library()))
        lib.probe_open.argtypes = [ctypes.c_size_t, ctypes.c_int, ctypes.POINTER(ctypes.c_double)]
        lib.probe_open.restype = ctypes.c_void_p
        lib.probe_round.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.probe_round.restype = ctypes.c_double
        lib.probe_close.argtypes = [ctypes.c_void_p]
        self.lib, self.gib, self.threads, self.huge = lib, gib, threads or cores(), huge
        huge_mb = ctypes.c_double()
        self.handle = lib.probe_open(int(gib * (1 << 30)), int(huge), ctypes.byref(huge_mb))
        if not self.handle:
            raise ProbeUnavailable(f"read_probe could not map {gib} GiB")
        self.huge_mb = huge_mb.value

    def round(self) -> float:
        """GB/s of one streaming read of the whole buffer (ctypes releases the GIL; the threads are C's)."""
        gbs = self.lib.probe_round(self.handle, self.threads)
        if gbs <= 0:
            raise ProbeUnavailable("read_probe round failed")
        return gbs

    def close(self) -> None:
        if self.handle:
            self.lib.probe_close(self.handle)
            self.handle = None

    def __enter__(self) -> "ReadProbe":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def measure_read_bandwidth(gib: float = 1.0, threads: int | None = None, rounds: int = 5,
                           huge: bool = True) -> dict[str, Any]:
    """One probe run: {"gbs": best round, "median_gbs", "rounds_gbs", "gib", "threads", "huge_pages",
    "huge_mb" (how much of the buffer the kernel actually backed with huge pages), "seconds"}.

    The best round, not the median: the probe asks what the memory system can deliver, and on a shared
    host every disturbance makes a round slower, never faster. Raises ProbeUnavailable.
    """
    t0 = time.perf_counter()
    with ReadProbe(gib, threads, huge) as probe:
        probe.round()  # the first read after the touch still finds part of the buffer in the caches
        values = [probe.round() for _ in range(rounds)]
    return {"gbs": round(max(values), 2), "median_gbs": round(statistics.median(values), 2),
            "rounds_gbs": [round(v, 2) for v in values], "gib": gib, "threads": probe.threads, "huge_pages": huge,
            "huge_mb": round(probe.huge_mb), "seconds": round(time.perf_counter() - t0, 2)}


def read_bandwidth_gbs(gib: float = 1.0, threads: int | None = None, rounds: int = 5,
                       huge: bool = True) -> float | None:
    """GB/s of the streaming read probe (best of `rounds`); None where the probe cannot run."""
    try:
        return measure_read_bandwidth(gib, threads, rounds, huge)["gbs"]
    except (ProbeUnavailable, OSError):
        return None


# ---------------------------------------------------------------------------------------------
# the host


def host_info(probe: bool = True, gib: float = 1.0, rounds: int = 5) -> dict[str, Any]:
    """The host record every bench prints and puts in its --json output (see the module docstring)."""
    model, flags = cpuinfo()
    info: dict[str, Any] = {
        "cpu": model, "cores": cores(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
        "flags": [f for f in FLAGS if f in flags], "thp": _thp_mode(), "mem_gib": _mem_gib(),
        "python": platform.python_version(), "read_bandwidth_gbs": None, "probe": None,
        # other people's work on this shared host: at load 5 on 2 cores a 1 GiB read ran at 17-20 GB/s, not 34,
        # and llama.cpp's OpenMP threads lose more to it than ours, so ratios move too (bench/kernels.md)
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    if probe:
        try:
            info["probe"] = measure_read_bandwidth(gib, rounds=rounds)
            info["read_bandwidth_gbs"] = info["probe"]["gbs"]
        except (ProbeUnavailable, OSError) as exc:
            info["probe"] = {"error": str(exc)}
    return info


def host_line(info: Mapping[str, Any]) -> str:
    """One line: CPU model, cores, the relevant flags, the measured read bandwidth."""
    flags = " ".join(info["flags"]) or "none of " + "/".join(FLAGS[:4])
    probe = info.get("probe") or {}
    if info.get("read_bandwidth_gbs") is not None:
        bw = (f"read bandwidth {info['read_bandwidth_gbs']:.1f} GB/s (streaming read of {probe['gib']:g} GiB, "
              f"{probe['threads']} threads, huge pages {probe['huge_mb']} MiB, best of {len(probe['rounds_gbs'])}, "
              f"median {probe['median_gbs']:.1f})")
    else:
        bw = "read bandwidth not measured" + (f" ({probe['error']})" if probe.get("error") else "")
    load = f"; load average {info['loadavg_1m']}" if info.get("loadavg_1m") is not None else ""
    return f"host: {info['cpu']}, {info['cores']} cores, {info.get('mem_gib')} GiB; flags: {flags}; {bw}{load}"


def status_kb(pid: int, field: str) -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM), None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def run_measured(cmd: list[str], timeout: float) -> dict[str, Any]:
    """Run cmd: {"seconds", "peak_kb", "rc", "stdout", "stderr"}. The peak is the child's VmHWM, polled every
    50 ms: not wait4's ru_maxrss, which Linux carries across fork + exec, so a child would report at least this
    process's own peak (a bench holding the 1 GiB bandwidth probe's buffer)."""
    import tempfile

    t0 = time.perf_counter()
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            peak = max(peak, status_kb(proc.pid, "VmHWM") or 0)
            if time.monotonic() > deadline:
                proc.kill()
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        return {"seconds": time.perf_counter() - t0, "peak_kb": peak, "rc": proc.returncode,
                "stdout": out.read().decode(errors="replace"), "stderr": err.read().decode(errors="replace")}


# ---------------------------------------------------------------------------------------------
# measuring against a peer


def interleaved(calls: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run the calls round-robin, ABAB...: round r runs each call once, in the mapping's order.

    Each call does one repetition and returns its measurement (seconds, tok/s: whatever the caller
    takes the median of). On a shared host whose speed drifts by 2x within minutes, timing all of one
    side and then all of the other measures the drift as much as the code; interleaved, a slow spell
    hits both sides alike, so medians of each side give a ratio that means something.
    """
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            out[name].append(call())
    return out


def llamacpp_build(venv: Path | None = None) -> dict[str, Any]:
    """How the llama.cpp peer was built (bench/peers/setup_llamacpp.sh's llamacpp.env) and whether it can
    run here: {"venv", "version", "ggml_flags", "cpu_flags", "build_cpu", "convert", "runs_here", "why"}.

    runs_here is False, with the reason, when there is no build, when it was built with GGML_NATIVE
    (it may use instructions this host lacks, e.g. AMX or AVX-512 built on another host), or when it
    needs a CPU flag this host does not have; rerun setup_llamacpp.sh then.
    """
    venv = venv or LLAMACPP_VENV
    env_file = venv / "llamacpp.env"
    record: dict[str, Any] = {"venv": str(venv), "runs_here": False}
    if not env_file.exists():
        return dict(record, why=f"no llama.cpp peer at {venv} (run bench/peers/setup_llamacpp.sh)")
    env = {}
    for line in env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        if key:
            env[key.strip()] = value.strip()
    record.update(version=env.get("LLAMACPP_VERSION"), ggml_flags=env.get("LLAMACPP_GGML_FLAGS"),
                  cpu_flags=env.get("LLAMACPP_CPU_FLAGS"), build_cpu=env.get("LLAMACPP_BUILD_CPU"),
                  convert=env.get("LLAMACPP_CONVERT"))
    if not record["ggml_flags"] or "GGML_NATIVE=OFF" not in record["ggml_flags"]:
        return dict(record, why="built with GGML_NATIVE (an old setup_llamacpp.sh): rerun it for explicit flags")
    missing = sorted(set((record["cpu_flags"] or "").split()) - cpuinfo()[1])
    if missing:
        return dict(record, why=f"built on {record['build_cpu']} for flags this host lacks: {' '.join(missing)}")
    return dict(record, runs_here=True, why=None)


def llamacpp_line(build: Mapping[str, Any]) -> str:
    """One line naming the peer build's instruction-set options (only the ON ones)."""
    if not build.get("ggml_flags"):
        return f"llama.cpp peer: {build.get('why')}"
    on = [f[2:-3] for f in build["ggml_flags"].split() if f.endswith("=ON")]
    state = "" if build["runs_here"] else f" (cannot run here: {build['why']})"
    return (f"llama.cpp peer: llama-cpp-python {build['version']}, GGML_NATIVE=OFF, {' '.join(on)}, AMX off, "
            f"built on {build['build_cpu']}{state}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--gib", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    info = host_info(gib=args.gib, rounds=args.rounds)
    info["llamacpp"] = llamacpp_build()
    if args.json:
        print(json.dumps(info, indent=1))
        return
    print(host_line(info))
    print(llamacpp_line(info["llamacpp"]))
    if info["probe"] and "rounds_gbs" in info["probe"]:
        print(f"probe rounds GB/s: {info['probe']['rounds_gbs']}")


if __name__ == "__main__":
    sys.exit(main())
