"""llama.cpp (ggml CPU backend) Q4_0 / Q8_0 mat-vec timings, as a peer for bench/kernels.py.

The peer is the llama-cpp-python venv made by bench/peers/setup_llamacpp.sh: its bundled ggml headers
and the libggml*.so it installs. `llamacpp_matvec.c` (next to this file) is compiled against them with
the system C compiler on first use (cached under ~/.cache/bitsmith/llamacpp-matvec/) and run as a
subprocess, one per (type, shape); nothing here imports llama_cpp, so the bench's own Python needs no
part of the venv.

Each measurement is one ggml graph of `copies` mul_mat nodes over distinct random weight matrices
(>= 256 MB together, so the weights stream from DRAM), computed by the CPU backend with 2 threads
(OpenMP's, as llama-cpp-python builds ggml), weights on transparent huge pages like the other
implementations in bench/kernels.py; each result is checked against a float64 reference.

    python bench/peers/llamacpp_matvec.py [--shapes 4096x4096,11008x4096] [--batches 1,4,16] [--json]
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = HERE / "llamacpp_matvec.c"
DEFAULT_VENV = Path.home() / ".cache" / "bitsmith" / "llamacpp-venv"
CACHE = Path.home() / ".cache" / "bitsmith" / "llamacpp-matvec"

# llama.cpp block formats: bytes per weight
BYTES_PER_WEIGHT = {"q4_0": 18 / 32, "q8_0": 34 / 32, "f16": 2.0, "f32": 4.0}

# (label, ggml type, repack): q4_0 is what llama.cpp runs by default on AVX2/AVX-512 (weights repacked
# into the CPU_REPACK buffer type, q4_0_8x8 gemv/gemm); q4_0_plain is the plain Q4_0 buffer
# (ggml_vec_dot_q4_0_q8_0, llamafile sgemm for batch > 1), as with `--no-repack`.
CONFIGS = (("q4_0", "q4_0", 1), ("q4_0_plain", "q4_0", 0), ("q8_0", "q8_0", 0))


class PeerUnavailable(RuntimeError):
    """The llama.cpp peer cannot run here; the message says why."""


def venv_dir() -> Path:
    return Path(os.environ.get("BITSMITH_LLAMACPP_VENV", DEFAULT_VENV))


def peer_env(venv: Path | None = None) -> dict[str, str]:
    """The paths setup_llamacpp.sh recorded in VENV/llamacpp.env."""
    venv = venv or venv_dir()
    env_file = venv / "llamacpp.env"
    if not env_file.exists():
        raise PeerUnavailable(f"no llama.cpp peer venv at {venv} (run bench/peers/setup_llamacpp.sh)")
    env = {}
    for line in env_file.read_text().splitlines():
        key, _, value = line.partition("=")
        if key:
            env[key.strip()] = value.strip()
    return env


def _libraries(libdir: str) -> list[str]:
    libs = []
    for name in ("libggml-base.so", "libggml-cpu.so", "libggml.so"):
        found = sorted(glob.glob(os.path.join(libdir, name + "*")), key=len)
        if not found:
            raise PeerUnavailable(f"{name} missing in {libdir} (llama-cpp-python built without shared ggml?)")
        libs.append(found[0])
    return libs


def helper_binary(venv: Path | None = None) -> Path:
    """Path of the compiled helper, compiling it first if the source, headers or libraries changed."""
    env = peer_env(venv)
    includes = [p for p in env.get("LLAMACPP_INCLUDE", "").split(":") if p]
    libdir = env.get("LLAMACPP_LIBDIR", "")
    if not includes or not os.path.exists(os.path.join(includes[0], "ggml.h")):
        raise PeerUnavailable(f"ggml headers not found ({env.get('LLAMACPP_INCLUDE')})")
    libs = _libraries(libdir)
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise PeerUnavailable("no C compiler (cc/gcc) to build the ggml mat-vec helper")
    key = hashlib.sha256(SOURCE.read_bytes())
    for lib in libs:
        st = os.stat(lib)
        key.update(f"{lib}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = CACHE / key.hexdigest()[:16] / "llamacpp_matvec"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"  # concurrent benches may compile at once
    cmd = [cc, "-O2", "-std=gnu11", str(SOURCE), "-o", tmp, *(f"-I{p}" for p in includes),
           *libs, f"-Wl,-rpath,{libdir}", "-lm", "-lpthread"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PeerUnavailable(f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-400:]}")
    os.replace(tmp, out)
    return out


def run(kind: str, n: int, k: int, batches: tuple[int, ...], *, threads: int = 2, repack: int = 1,
        min_mb: float = 256, repeats: int = 7, omp_wait_policy: str | None = None, venv: Path | None = None,
        timeout: float = 600) -> list[dict[str, Any]]:
    """One helper run: a dict per batch size (see llamacpp_matvec.c for the keys).

    omp_wait_policy: OMP_WAIT_POLICY for the helper (None: leave the environment's; llama-cpp-python
    builds ggml with OpenMP, and ggml_barrier is then `#pragma omp barrier`).
    """
    exe = helper_binary(venv)
    cmd = [str(exe), kind, str(n), str(k), ",".join(map(str, batches)), "--threads", str(threads),
           "--min-mb", str(min_mb), "--repeats", str(repeats), "--repack", str(repack)]
    env = dict(os.environ)
    if omp_wait_policy:
        env["OMP_WAIT_POLICY"] = omp_wait_policy
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise PeerUnavailable(f"{exe.name} {kind} {n}x{k} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    for row in rows:
        if row["rel_err"] > 0.05:
            raise PeerUnavailable(f"llama.cpp {kind} {n}x{k} batch {row['batch']}: relative error {row['rel_err']:.3g}")
        row["omp_wait_policy"] = env.get("OMP_WAIT_POLICY", "default")
        row["wall_s"] = wall
    return rows


class Session:
    """One helper process in --serve mode: the caller runs each timed repetition when it chooses, so it can
    interleave them with its own (ABAB...). Per batch size: begin() waits for the warm sweep, sweep() times
    one graph compute (seconds per mul_mat), end() checks the result and returns the row (its `sec` is the
    helper's median of the sweeps). Every wait has a timeout; on expiry the process is killed and
    subprocess.TimeoutExpired raised (GOMP's spinning barriers can stall a run for minutes under load); a
    helper that dies raises PeerUnavailable.
    """

    def __init__(self, kind: str, n: int, k: int, batches: tuple[int, ...], *, threads: int = 2, repack: int = 1,
                 min_mb: float = 256, omp_wait_policy: str | None = None, venv: Path | None = None):
        sys.path.insert(0, str(HERE))
        try:
            from lineproc import LineProcess, PeerExited
        finally:
            sys.path.pop(0)
        exe = helper_binary(venv)
        cmd = [str(exe), kind, str(n), str(k), ",".join(map(str, batches)), "--threads", str(threads),
               "--min-mb", str(min_mb), "--repack", str(repack), "--serve", "1"]
        env = dict(os.environ)
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.policy = env.get("OMP_WAIT_POLICY", "default")
        self.proc_io = LineProcess(cmd, env, f"llama.cpp {kind} {n}x{k} (OMP_WAIT_POLICY {self.policy})")
        self.proc = self.proc_io.proc
        self._exited = PeerExited

    def _call(self, command: str | None, timeout: float) -> dict[str, Any]:
        try:
            return self.proc_io.ask(command, timeout) if command else self.proc_io.read(timeout)
        except self._exited as exc:
            raise PeerUnavailable(str(exc)) from None

    def begin(self, timeout: float = 600) -> int:
        return self._call(None, timeout)["ready"]

    def sweep(self, timeout: float = 600) -> float:
        return self._call("s", timeout)["sec"]

    def end(self, timeout: float = 600) -> dict[str, Any]:
        row = self._call("n", timeout)
        if row["rel_err"] > 0.05:
            raise PeerUnavailable(f"{self.proc_io.label} batch {row['batch']}: relative error {row['rel_err']:.3g}")
        row["omp_wait_policy"] = self.policy
        return row

    def close(self, kill: bool = False) -> None:
        self.proc_io.close(kill)


# GOMP's default barrier spins without yielding; on the shared 2-vCPU VM, whenever any other process wants
# a core, a spinning thread holds the core its sibling needs and 2-thread ggml collapses (measured 1-3 GB/s
# instead of ~24 for 4096x4096 Q4_0 with one niced compile running; minutes for a graph of thousands of
# small mat-vecs). Passive (futex) barriers survive load but cost a wake-up per barrier on small matrices.
# Each row keeps the faster of the two; passive runs first, and the spinning run is abandoned when it
# takes DEFAULT_TIMEOUT_FACTOR times as long.
POLICIES = ("passive", None)
DEFAULT_TIMEOUT_FACTOR = 4


def bench(shapes: tuple, batches: tuple, threads: int = 2, min_mb: float = 256, configs: tuple = CONFIGS,
          policies: tuple = POLICIES) -> dict[tuple[str, int, int, int], dict[str, Any]]:
    """{(label, out, in, batch): helper row} for every config in `configs`, the faster over `policies`
    (OMP_WAIT_POLICY values, see POLICIES); raises PeerUnavailable."""
    out: dict[tuple[str, int, int, int], dict[str, Any]] = {}
    for label, kind, repack in configs:
        for n, k in shapes:
            wall = 0.0
            for policy in policies:
                timeout = max(15.0, DEFAULT_TIMEOUT_FACTOR * wall) if wall else 600.0
                try:
                    rows = run(kind, n, k, tuple(batches), threads=threads, repack=repack, min_mb=min_mb,
                               omp_wait_policy=policy, timeout=timeout)
                except subprocess.TimeoutExpired:
                    if not wall:
                        raise PeerUnavailable(f"llama.cpp {kind} {n}x{k}: no result in {timeout:.0f} s") from None
                    continue  # keep the other policy's rows
                wall = wall or rows[0]["wall_s"]
                for row in rows:
                    key = (label, n, k, row["batch"])
                    if key not in out or row["sec"] < out[key]["sec"]:
                        out[key] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default="4096x4096,11008x4096", help="OUTxIN,... (out = rows)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--min-mb", type=float, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    shapes = tuple(tuple(int(v) for v in s.split("x")) for s in args.shapes.split(","))
    batches = tuple(int(b) for b in args.batches.split(","))
    try:
        res = bench(shapes, batches, args.threads, args.min_mb)
    except PeerUnavailable as exc:
        print(f"llama.cpp peer unavailable: {exc}", file=sys.stderr)
        sys.exit(1)
    if args.json:
        print(json.dumps([dict(row, label=key[0]) for key, row in res.items()], indent=1))
        return
    print("| out x in | batch | " + " | ".join(f"llama.cpp {c[0]}" for c in CONFIGS) + " |")
    print("|---|---|" + "---|" * len(CONFIGS))
    for n, k in shapes:
        for b in batches:
            cells = [f"{r['gbs']:.1f} GB/s ({r['sec'] * 1e6:.1f} us, OMP {r['omp_wait_policy']})"
                     for r in (res[(c[0], n, k, b)] for c in CONFIGS)]
            print(f"| {n}x{k} | {b} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
