"""GEMV kernel benchmark: our int4 GEMV vs the machine's read bandwidth, torch fp32, onnxruntime int4 and
llama.cpp Q4_0 / Q8_0 (ggml CPU backend, from the venv of bench/peers/setup_llamacpp.sh; skipped with a
note saying why when that venv is missing or was built for flags this host lacks); and at batch 1 our GEMVs
of the imported GGUF K-quant forms Q4_K (int4-g32-min-s256) and Q6_K (int6-g16-sym-s256) next to int4 g32.

    python bench/kernels.py [--json] [--quick | --smoke | --batch1] [--threads N] [--rounds R] [--no-peers]

How it measures, so ratios mean something on a shared host whose speed drifts 2x within minutes:
every implementation of one (shape, batch) cell is set up first (each over distinct weight copies of
>= 256 MB, so weights stream from DRAM, on transparent huge pages), then the repetitions are
INTERLEAVED: round r times one sweep of every implementation in turn (ABAB...: the read-bandwidth
probe, ours, torch, onnxruntime, llama.cpp through its helper in --serve mode), and each cell is the
median of its --rounds rounds. A slow spell hits every column alike instead of whichever ran then, so
the ratios to llama.cpp and the "% of bandwidth alongside" (of the probe's median in the same rounds)
compare like with like. The host line (CPU, flags, the streaming read bandwidth of bench/hostinfo.py)
heads the table and is in --json's "host".

--smoke: one small shape at batch 1, one round, 16 MiB of weight copies: checks that every path still
runs (tests/bench/test_bench_smoke.py), measures nothing worth quoting.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import mmap
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

HERE = Path(__file__).resolve().parent
# bench/ goes to the END of sys.path (Python puts a script's own folder first): helpers here (hostinfo,
# peers) are still found, but bench/kernels.py no longer shadows the `kernels` package transformers imports
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE] + [str(HERE)]

from hostinfo import ProbeUnavailable, ReadProbe, host_info, host_line, llamacpp_build, llamacpp_line  # noqa: E402

CORES = len(os.sched_getaffinity(0))
THREADS = CORES  # set by --threads before anything imports tvm

SHAPES = ((4096, 4096), (11008, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in)
BATCHES = (1, 4, 16)
BITS, GROUP = 4, 32
MIN_BYTES = 256 << 20  # weight copies per measurement: more than this, so they come from DRAM
PROBE_GIB = 0.5  # the probe buffer read in every round (16x the L3 of these hosts)
REPEATS = 7  # rounds
# Pause after each timed sweep: thread pools (GOMP's with OMP_WAIT_POLICY unset, TVM's) keep spinning for
# a while after their work ends and would steal a core from whichever implementation runs next.
SETTLE_S = 0.02
LLAMACPP_COLUMNS = ("q4_0", "q4_0_plain", "q8_0")  # labels of bench/peers/llamacpp_matvec.CONFIGS
# imported K-quant forms (GemvSpec with two-level scales), batch 1 only: column -> (GGUF type, GemvSpec fields)
FORMS = {"q4k_gemv": ("Q4_K", {"bits": 4, "group_size": 32, "sym": False, "offset": True, "super_group": 256}),
         "q6k_gemv": ("Q6_K", {"bits": 6, "group_size": 16, "sym": True, "super_group": 256})}
COLUMNS = ("int4_gemv", "q4k_gemv", "q6k_gemv", "int4_gemv_i8a", "int4_gemv_i8a_asym", "int4_gemv_x16", "int4_gemv_x16_asym",
           "torch_fp32", "ort_int4_acc4", "ort_int4_acc0") + tuple(f"llamacpp_{label}" for label in LLAMACPP_COLUMNS)


def hugepage_array(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A zeroed array in an mmap arena that asked for transparent huge pages before first touch.

    THP is in `madvise` mode on these machines: without the request the kernels see 4 KiB pages and
    lose ~30% of the read bandwidth (cpu-performance-notes.md).
    """
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    arena = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        arena.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(arena, dtype=dtype, count=int(np.prod(shape))).reshape(shape)


def hugepage_copies(copies: int, shape: tuple[int, ...], dtype: Any) -> list[np.ndarray]:
    """`copies` arrays in one huge-page arena, each starting on a 64-byte boundary (TVM requires it)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    stride = -(-nbytes // 64) * 64
    arena = hugepage_array((copies * stride,), np.uint8)
    return [arena[c * stride:c * stride + nbytes].view(dtype).reshape(shape) for c in range(copies)]


def log(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


def copies_for(nbytes: int) -> int:
    return max(2, -(-MIN_BYTES // nbytes) + 1)


def timed(call: Callable[[int], Any], copies: int, passes: int = REPEATS) -> float:
    """Median seconds per call over `passes` sweeps through all weight copies (after one warm sweep)."""
    for c in range(copies):
        call(c)
    times = []
    for _ in range(passes):
        t0 = time.perf_counter()
        for c in range(copies):
            call(c)
        times.append((time.perf_counter() - t0) / copies)
    return statistics.median(times)


def sweep_of(call: Callable[[int], Any], copies: int, overhead: float = 0.0) -> Callable[[], float]:
    """One repetition: seconds per call over one sweep through all weight copies, call overhead subtracted."""
    def sweep() -> float:
        t0 = time.perf_counter()
        for c in range(copies):
            call(c)
        return max((time.perf_counter() - t0) / copies - overhead, 1e-9)
    return sweep


# ---------------------------------------------------------------------------------------------
# implementations: each prepares one shape (weights, correctness check), then hands out one sweep
# function per (column, batch); `start`/`finish` bracket a batch size (the llama.cpp helper needs it)


class Impl:
    columns: dict[str, int] = {}  # column -> weight bytes per call

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        raise NotImplementedError

    def finish(self, batch: int) -> None:
        pass

    def close(self) -> None:
        pass


def tvm_tensor(a: np.ndarray) -> Any:
    """Zero-copy TVM view of a 64-byte aligned numpy array (keeps its huge pages), else a TVM copy."""
    import tvm

    if a.ctypes.data % 64 == 0 and a.flags.c_contiguous:
        return tvm.runtime.from_dlpack(a)
    return tvm.runtime.tensor(np.ascontiguousarray(a))


def tvm_call_overhead(func: Any) -> float:
    """Seconds of Python + FFI per call, from a 1x16 GEMV that does almost nothing."""
    args = [tvm_tensor(np.zeros(shape, np.float32)) for shape in ((1, 16), (1, 16), (1, 1))]
    return timed(lambda _: func(*args), 2000, 5)


class Ours(Impl):
    """int4 g32 sym GEMV with fp32 activations (GemvSpec)."""

    def __init__(self, n: int, k: int, batches: tuple, module: Any, overhead: float):
        from bitsmith.codegen.gemv import GemvSpec
        from bitsmith.codegen.kernel import call_kernel
        from bitsmith.compiler.ops.quant import dequantize_packed

        rng = np.random.default_rng(0)
        spec0 = GemvSpec(n, k, BITS, GROUP, True, 1)
        self.copies = copies_for(spec0.weight_bytes())
        wshape = spec0.weight_shape()
        # random words are valid packed 4-bit codes in any layout
        qw = hugepage_copies(self.copies, wshape, np.uint32)
        sc = hugepage_copies(self.copies, (n, spec0.n_groups), np.float16)
        for c in range(self.copies):
            qw[c][:] = rng.integers(0, 1 << 32, wshape, dtype=np.uint32)
            sc[c][:] = (rng.random(sc[c].shape) * 0.02).astype(np.float16)
        self.weights = [(tvm_tensor(qw[c]), tvm_tensor(sc[c])) for c in range(self.copies)]
        self.args: dict[int, tuple] = {}
        for b in batches:
            spec = GemvSpec(n, k, BITS, GROUP, True, b)
            x = rng.standard_normal((b, k)).astype(np.float32)
            attrs = {"bits": BITS, "group_size": GROUP, "in_features": k, "sym": True}
            ref = x @ dequantize_packed(qw[0], sc[0], None, attrs).T
            y = call_kernel(spec, [x, qw[0], sc[0]], [np.empty((b, n), np.float32)], module)[0]
            err = np.abs(y - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f"{spec.name}: relative error {err:.2e}"
            self.args[b] = (module[spec.name], tvm_tensor(x), tvm_tensor(np.zeros((b, n), np.float32)))
        self.overhead = overhead
        self.columns = {"int4_gemv": n * k // 2 + n * (k // GROUP) * 2}  # packed codes + fp16 scales

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        func, xt, yt = self.args[batch]
        return {"int4_gemv": sweep_of(lambda c: func(xt, *self.weights[c], yt), self.copies, self.overhead)}


class OursForms(Impl):
    """GEMVs of the GGUF K-quant forms at batch 1 (FORMS): packed codes, int8 scale (and offset) codes per group,
    fp16 super scales (and super offsets) per 256 columns; GB/s of all of those bytes (GemvSpec.weight_bytes)."""

    def __init__(self, n: int, k: int, module: Any, overhead: float):
        from bitsmith.codegen.gemv import GemvSpec
        from bitsmith.compiler.ops.quant import dequantize_packed

        rng = np.random.default_rng(4)
        self.calls: dict[str, tuple[Callable[[int], Any], int]] = {}
        self.columns = {}
        for key, (_, form) in FORMS.items():
            spec = GemvSpec(n, k, batch=1, **form)
            copies = copies_for(spec.weight_bytes())
            parts = [hugepage_copies(copies, spec.weight_shape(), np.uint32)]
            parts += [hugepage_copies(copies, shape, dtype) for _, shape, dtype in spec.param_specs()]
            for c in range(copies):  # random words are valid codes; K-quant-like scale codes and super scales
                parts[0][c][:] = rng.integers(0, 1 << 32, parts[0][c].shape, dtype=np.uint32)
                for (name, shape, dtype), part in zip(spec.param_specs(), parts[1:]):
                    part[c][:] = (rng.integers(0, 64, shape) if dtype == "int8" else
                                  (rng.random(shape) * 0.002 * (-1 if name == "super_zeros" else 1))).astype(dtype)
            params = dict(zip([name for name, _, _ in spec.param_specs()], [p[0] for p in parts[1:]]))
            attrs = {"bits": spec.bits, "group_size": spec.group_size, "in_features": k, "sym": spec.sym, **form}
            w0 = dequantize_packed(parts[0][0], params["scales"], params.get("zeros"), attrs,
                                   params.get("super_scales"), params.get("super_zeros"))
            x = rng.standard_normal((1, k)).astype(np.float32)
            xt, yt = tvm_tensor(x), tvm_tensor(np.zeros((1, n), np.float32))
            weights = [tuple(tvm_tensor(p[c]) for p in parts) for c in range(copies)]
            func = module[spec.name]
            func(xt, *weights[0], yt)
            ref = x @ w0.T
            err = np.abs(yt.numpy() - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f"{spec.name}: relative error {err:.2e}"
            self.calls[key] = ((lambda f, xt, yt, ws: lambda c: f(xt, *ws[c], yt))(func, xt, yt, weights), copies)
            self.columns[key] = spec.weight_bytes()
        self.overhead = overhead

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        if batch != 1:
            return {}
        return {key: sweep_of(call, copies, self.overhead) for key, (call, copies) in self.calls.items()}


class OursInt8(Impl):
    """int8-activation VNNI GEMVs on the same int4 weights: QGemvI8Spec (the artifact's layout) and
    QGemvX16Spec (16 output rows interleaved, as the runtime lays them out at load), sym and asym."""

    def __init__(self, n: int, k: int, batches: tuple, module: Any, overhead: float):
        from bitsmith.codegen.gemv_int8 import QGemvI8Spec
        from bitsmith.codegen.gemv_x16 import QGemvX16Spec
        from bitsmith.compiler.ops.quant import dequantize_packed
        from bitsmith.runtime.interleave import kernel_weight, x16_name

        rng = np.random.default_rng(3)
        spec0 = QGemvI8Spec(n, k, BITS, GROUP, False, 1)
        self.copies = copies = copies_for(spec0.weight_bytes())
        qw = hugepage_copies(copies, spec0.weight_shape(), np.uint32)
        sc = hugepage_copies(copies, (n, spec0.n_groups), np.float16)
        zs = hugepage_copies(copies, (n, spec0.n_groups), np.float16)
        for c in range(copies):
            qw[c][:] = rng.integers(0, 1 << 32, spec0.weight_shape(), dtype=np.uint32)
            sc[c][:] = (rng.random(sc[c].shape) * 0.02).astype(np.float16)
            zs[c][:] = (rng.random(zs[c].shape) * 15).astype(np.float16)
        names = [x16_name("q", BITS, k), x16_name("s"), x16_name("z")]
        x16 = []  # the same weights as the runtime lays them out (flat arrays, huge pages again)
        for name, src in zip(names, (qw, sc, zs)):
            first = kernel_weight(name, {name.split("@")[0]: src[0]})
            dst = hugepage_copies(copies, first.shape, first.dtype)
            for c in range(copies):
                dst[c][:] = kernel_weight(name, {name.split("@")[0]: src[c]})
            x16.append(dst)
        ours_bytes = n * k // 2 + n * (k // GROUP) * 2
        self.calls: dict[tuple[str, int], Callable[[int], Any]] = {}
        self.columns = {}
        for family, prefix, layout in ((QGemvI8Spec, "int4_gemv_i8a", (qw, sc, zs)),
                                       (QGemvX16Spec, "int4_gemv_x16", x16)):
            for sym in (True, False):
                key = prefix + ("" if sym else "_asym")
                self.columns[key] = ours_bytes + (0 if sym else n * (k // GROUP) * 2)  # asym also reads zeros
                weights = [(tvm_tensor(layout[0][c]), tvm_tensor(layout[1][c]))
                           + (() if sym else (tvm_tensor(layout[2][c]),)) for c in range(copies)]
                attrs = {"bits": BITS, "group_size": GROUP, "in_features": k, "sym": sym}
                w0 = dequantize_packed(qw[0], sc[0], None if sym else zs[0], attrs)
                for b in batches:
                    spec = family(n, k, BITS, GROUP, sym, b)
                    x = rng.standard_normal((b, k)).astype(np.float32)
                    xt, yt = tvm_tensor(x), tvm_tensor(np.zeros((b, n), np.float32))
                    func = module[spec.name]
                    func(xt, *weights[0], yt)
                    ref = x @ w0.T  # int8 activations: ~1% error (tests/codegen/test_gemv_int8.py checks exactly)
                    err = np.abs(yt.numpy() - ref).max() / np.abs(ref).max()
                    assert err < 3e-2, f"{spec.name}: relative error {err:.2e}"
                    self.calls[(key, b)] = (lambda f, xt, yt, ws: lambda c: f(xt, *ws[c], yt))(func, xt, yt, weights)
        self.overhead = overhead

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        return {key: sweep_of(self.calls[(key, batch)], self.copies, self.overhead) for key in self.columns}


class Torch(Impl):
    """torch fp32 F.linear over huge-page weight copies (call overhead subtracted)."""

    def __init__(self, n: int, k: int, batches: tuple, overhead: float):
        import torch

        self.copies = copies_for(n * k * 4)
        arena = hugepage_copies(self.copies, (n, k), np.float32)
        w0 = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
        for a in arena:
            a[:] = w0
        self.ws = [torch.from_numpy(a) for a in arena]
        self.xs = {b: torch.randn(b, k) for b in batches}
        self.overhead = overhead
        self.columns = {"torch_fp32": n * k * 4}

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        import torch
        import torch.nn.functional as F

        x, ws = self.xs[batch], self.ws

        def call(c: int) -> None:
            with torch.inference_mode():
                F.linear(x, ws[c])
        return {"torch_fp32": sweep_of(call, self.copies, self.overhead)}


def torch_overhead() -> float:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    tx, tw = torch.zeros(1, 16), torch.zeros(1, 16)

    def call(_: int) -> None:
        with torch.inference_mode():
            F.linear(tx, tw)
    return timed(call, 2000, 5)


def ort_model(n: int, k: int, copies: int, accuracy: int, rng: np.random.Generator) -> Any:
    """An onnxruntime session with `copies` independent MatMulNBits (int4, block 32, sym) on one input."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    blocks = k // GROUP
    nodes, inits, outputs = [], [], []
    for c in range(copies):
        b = rng.integers(0, 256, (n, blocks, GROUP // 2), dtype=np.uint8)
        s = (rng.random(n * blocks) * 0.02).astype(np.float32)
        inits += [numpy_helper.from_array(b, f"B{c}"), numpy_helper.from_array(s, f"S{c}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{c}", f"S{c}"], [f"Y{c}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=GROUP, accuracy_level=accuracy))
        outputs.append(helper.make_tensor_value_info(f"Y{c}", TensorProto.FLOAT, ["batch", n]))
    graph = helper.make_graph(nodes, "gemv", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", k])],
                              outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = THREADS
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


class Ort(Impl):
    """onnxruntime MatMulNBits, accuracy levels 4 and 0: one session runs all copies, so one session.run
    is one sweep and the Python call is amortized."""

    def __init__(self, n: int, k: int, batches: tuple):
        rng = np.random.default_rng(2)
        self.copies = copies_for(n * k // 2 + n * (k // GROUP) * 4)
        self.sessions = {f"ort_int4_acc{a}": ort_model(n, k, self.copies, a, rng) for a in (4, 0)}
        self.feeds = {b: {"A": rng.standard_normal((b, k)).astype(np.float32)} for b in batches}
        self.columns = {key: n * k // 2 + n * (k // GROUP) * 4 for key in self.sessions}  # codes + fp32 scales

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        def sweep(sess: Any, feed: dict) -> Callable[[], float]:
            def run() -> float:
                t0 = time.perf_counter()
                sess.run(None, feed)
                return (time.perf_counter() - t0) / self.copies
            return run
        return {key: sweep(sess, self.feeds[batch]) for key, sess in self.sessions.items()}


class LlamaCpp(Impl):
    """llama.cpp's mat-vec helper (bench/peers/llamacpp_matvec.c) in --serve mode: one process per config
    and OMP_WAIT_POLICY, weights set up once, each sweep run when the round asks for it.

    Each cell is the faster of the policies' medians (GOMP's spinning barriers, the default, collapse
    under any other load on 2 vCPUs; passive ones cost a wake-up per barrier). A default-policy process
    whose sweep takes ABANDON_FACTOR times the passive one's of the same round twice in a row (once can be
    a disturbance), or times out, is dropped for the rest of the shape (NaN from then on; medians skip it).
    """

    ABANDON_FACTOR = 4

    def __init__(self, n: int, k: int, batches: tuple, min_mb: float, peer: Any):
        self.peer, self.rows, self.dropped = peer, {}, []
        self.sessions = {}
        for label, kind, repack in peer.CONFIGS:
            for policy in peer.POLICIES:
                self.sessions[(label, policy)] = peer.Session(kind, n, k, batches, threads=THREADS, repack=repack,
                                                              min_mb=min_mb, omp_wait_policy=policy)
        self.columns = {}
        self.n, self.k = n, k

    def start(self, batch: int) -> dict[str, Callable[[], float]]:
        last: dict[str, float] = {}
        strikes: dict[str, int] = {}
        calls: dict[str, Callable[[], float]] = {}
        for (label, policy), sess in self.sessions.items():
            if sess.proc.poll() is not None:
                continue
            sess.begin()

            def sweep(sess: Any = sess, label: str = label, policy: str | None = policy) -> float:
                if sess.proc.poll() is not None:
                    return math.nan
                first = policy == self.peer.POLICIES[0]
                timeout = 600.0 if first else max(15.0, self.ABANDON_FACTOR * last.get(label, 0) * self.copies(label))
                try:
                    sec = sess.sweep(timeout)
                except subprocess.TimeoutExpired:
                    if first:
                        raise self.peer.PeerUnavailable(f"llama.cpp {label} {self.n}x{self.k}: no sweep in {timeout:.0f} s")
                    self.dropped.append(f"{label} {self.n}x{self.k} OMP {policy or 'default'} (timed out)")
                    return math.nan
                if first:
                    last[label] = sec
                elif sec > self.ABANDON_FACTOR * last.get(label, math.inf):
                    strikes[label] = strikes.get(label, 0) + 1
                    if strikes[label] >= 2:
                        self.dropped.append(f"{label} {self.n}x{self.k} OMP {policy or 'default'} "
                                            f"({sec / last[label]:.0f}x the passive sweep, twice)")
                        sess.close(kill=True)
                else:
                    strikes[label] = 0
                return sec
            calls[f"llamacpp_{label}@{policy or 'default'}"] = sweep
        return calls

    def copies(self, label: str) -> int:
        row = next((r for (lab, _), r in self.rows.items() if lab == label), None)
        return row["copies"] if row else 64

    def finish(self, batch: int) -> None:
        for (label, policy), sess in self.sessions.items():
            if sess.proc.poll() is None:
                self.rows[(label, policy)] = row = sess.end()
                self.columns[f"llamacpp_{label}"] = row["weight_bytes"]

    def close(self) -> None:
        for sess in self.sessions.values():
            sess.close()


def load_peer() -> tuple[Any, str | None]:
    """(the llamacpp_matvec module, None) or (None, why the peer is skipped)."""
    build = llamacpp_build()
    if not build["runs_here"]:
        return None, f"llama.cpp: skipped: {build['why']}"
    sys.path.insert(0, str(HERE / "peers"))
    try:
        import llamacpp_matvec as peer
    finally:
        sys.path.pop(0)
    try:
        peer.helper_binary()
    except (peer.PeerUnavailable, OSError) as exc:
        return None, f"llama.cpp: skipped: {exc}"
    return peer, None


# ---------------------------------------------------------------------------------------------


def measure_cell(impls: list[Impl], probe: ReadProbe | None, batch: int, rounds: int) -> dict[str, list[float]]:
    """Every implementation's sweeps for one batch size, interleaved: round r runs one sweep of each in turn
    (after one untimed warm sweep each). Returns {column: [seconds per call of each round]} and, under
    "bw_gbs", the probe's GB/s in each round."""
    calls: dict[str, Callable[[], float]] = {}
    for impl in impls:
        calls.update(impl.start(batch))
    if probe is not None:
        calls = {"bw_gbs": probe.round, **calls}
    for call in calls.values():  # warm: caches, page tables, thread pools
        call()
        time.sleep(SETTLE_S)
    out: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            out[name].append(call())
            time.sleep(SETTLE_S)
    for impl in impls:
        impl.finish(batch)
    return out


def median(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return statistics.median(kept) if kept else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="4096x4096 and 576x576 at batch 1 only")
    parser.add_argument("--batch1", action="store_true", help="every shape at batch 1 only (the K-quant columns)")
    parser.add_argument("--smoke", action="store_true", help="576x576 batch 1, one round, 16 MiB of copies")
    parser.add_argument("--threads", type=int, default=CORES, help="threads for every implementation")
    parser.add_argument("--rounds", type=int, default=None, help=f"interleaved rounds per cell (default {REPEATS})")
    parser.add_argument("--no-peers", action="store_true", help="skip torch, onnxruntime and llama.cpp")
    args = parser.parse_args()
    global THREADS, MIN_BYTES
    THREADS = args.threads
    # TVM's pool defaults to hardware_concurrency / 2 threads (1 on a 2-vCPU VM); read at first use
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    shapes, batches = ((SHAPES[0], SHAPES[2]), (1,)) if args.quick else (SHAPES, (1,) if args.batch1 else BATCHES)
    rounds, probe_gib = args.rounds or REPEATS, PROBE_GIB
    if args.smoke:
        shapes, batches, MIN_BYTES, probe_gib = ((576, 576),), (1,), 16 << 20, 1 / 16
        rounds = args.rounds or 1

    log("host")
    host = host_info(gib=probe_gib if args.smoke else 1.0, rounds=2 if args.smoke else 5)
    build = llamacpp_build()

    from bitsmith.codegen.gemv import GemvSpec
    from bitsmith.codegen.gemv_int8 import QGemvI8Spec
    from bitsmith.codegen.gemv_x16 import QGemvX16Spec
    from bitsmith.codegen.kernel import build_module
    from bitsmith.codegen.target import host_target

    target = host_target()
    vnni = target.supports_int8_activations
    log("building kernels")
    tiny = GemvSpec(1, 16, 32)
    specs = [GemvSpec(n, k, BITS, GROUP, True, b) for n, k in shapes for b in batches] + [tiny]
    specs += [GemvSpec(n, k, batch=1, **form) for _, form in FORMS.values() for n, k in shapes]
    if vnni:
        specs += [family(n, k, BITS, GROUP, sym, b) for family in (QGemvI8Spec, QGemvX16Spec)
                  for sym in (True, False) for n, k in shapes for b in batches]
    module = build_module(specs)
    overhead = tvm_call_overhead(module[tiny.name])
    t_overhead = None if args.no_peers else torch_overhead()
    peer, peer_note = (None, "llama.cpp: skipped (--no-peers)") if args.no_peers else load_peer()
    try:
        probe = ReadProbe(probe_gib, THREADS)
    except (ProbeUnavailable, OSError) as exc:
        probe = None
        log(f"no bandwidth alongside: {exc}")

    rows, dropped, policies_won = [], [], set()
    for n, k in shapes:
        log(f"{n}x{k}: setting up")
        impls: list[Impl] = [Ours(n, k, batches, module, overhead), OursForms(n, k, module, overhead)]
        if vnni:
            impls.append(OursInt8(n, k, batches, module, overhead))
        if not args.no_peers:
            impls += [Torch(n, k, batches, t_overhead), Ort(n, k, batches)]
        lcpp = None
        if peer is not None:
            try:
                lcpp = LlamaCpp(n, k, batches, MIN_BYTES / (1 << 20), peer)
            except (peer.PeerUnavailable, OSError) as exc:
                peer, peer_note = None, f"llama.cpp: skipped: {exc}"
        try:
            for b in batches:
                log(f"{n}x{k} batch {b}: {rounds} interleaved rounds")
                try:
                    times = measure_cell(impls + ([lcpp] if lcpp else []), probe, b, rounds)
                except Exception as exc:  # the peer failed mid-run: measure ours without it
                    if lcpp is None or not isinstance(exc, (peer.PeerUnavailable, OSError, subprocess.SubprocessError)):
                        raise
                    peer_note = f"llama.cpp: skipped from {n}x{k} batch {b} on: {exc}"
                    lcpp.close()
                    lcpp = peer = None
                    times = measure_cell(impls, probe, b, rounds)
                row: dict[str, Any] = {"out": n, "in": k, "batch": b, "rounds": rounds}
                if "bw_gbs" in times:
                    row["bw_gbs"] = median(times["bw_gbs"])
                nbytes = {key: v for impl in impls + ([lcpp] if lcpp else []) for key, v in impl.columns.items()}
                for key in COLUMNS:
                    if key.startswith("llamacpp_"):
                        by_policy = {name.split("@")[1]: median(v) for name, v in times.items()
                                     if name.split("@")[0] == key}
                        by_policy = {p: v for p, v in by_policy.items() if not math.isnan(v)}
                        if not by_policy:
                            continue
                        policy = min(by_policy, key=by_policy.get)
                        policies_won.add(policy)
                        sec, sec_rounds = by_policy[policy], times[f"{key}@{policy}"]
                    elif key in times:
                        sec, sec_rounds = median(times[key]), times[key]
                    else:
                        continue
                    cell = {"us": sec * 1e6, "gbs": nbytes[key] / sec / 1e9, "us_rounds": [None if math.isnan(s) else s * 1e6 for s in sec_rounds]}
                    if "bw_gbs" in row:
                        cell["of_bw"] = cell["gbs"] / row["bw_gbs"]
                    row[key] = cell
                rows.append(row)
        finally:
            if lcpp is not None:
                dropped += lcpp.dropped
                lcpp.close()
            for impl in impls:
                impl.close()
            del impls
            gc.collect()
    if probe is not None:
        probe.close()

    if peer_note is None:
        peer_note = (f"llama.cpp (llama-cpp-python {build['version']}, ggml CPU backend built with OpenMP and "
                     f"{llamacpp_line(build).split(', ', 1)[1]}; {THREADS} threads, one graph of mul_mat nodes over "
                     "all copies, run by llamacpp_matvec.c --serve between our sweeps): Q4_0 = weights in the "
                     "CPU_REPACK buffer (llama.cpp's default on AVX2/AVX-512: q4_0_8x8), Q4_0 plain = "
                     "ggml_vec_dot_q4_0_q8_0 / llamafile sgemm; Q4_0 18 B and Q8_0 34 B per 32 weights; activations "
                     "quantized to Q8_0 inside each mul_mat; each cell the faster median of OMP_WAIT_POLICY passive "
                     f"and unset (policies that won: {', '.join(sorted(policies_won)) or '-'}"
                     + (f"; dropped: {'; '.join(dropped)}" if dropped else "") + ")")
    head = next((r for r in rows if (r["out"], r["in"], r["batch"]) == (4096, 4096, 1)), rows[0])
    head_name = f"{head['out']}x{head['in']} batch {head['batch']}"

    def ratio(ours: str, theirs: str) -> float | None:
        return head[ours]["gbs"] / head[theirs]["gbs"] if ours in head and theirs in head else None

    def of_bw(key: str) -> float | None:
        return head[key].get("of_bw") if key in head else None

    notes = [f"{rounds} rounds per cell, interleaved: each round times one sweep of every column in turn (the read "
             "probe first), each cell is the median of its rounds; % = of the probe's median in the same rounds",
             "GB/s = weight bytes read per call / time (ours: codes + fp16 scales, 0.5625 B/weight; "
             "onnxruntime: codes + fp32 scales, 0.625 B/weight; torch: 4 B/weight); int4 g32 symmetric",
             f"Python call overhead subtracted: TVM {overhead * 1e6:.1f} us"
             + (f", torch {t_overhead * 1e6:.1f} us" if t_overhead else "")
             + "; onnxruntime runs all copies in one session.run",
             "ours int8-act = QGemvI8Spec: the same int4 weights, x quantized per 32 values to int8 in the kernel, "
             "u8 x s8 vpdpbusd (AVX-512 VNNI); asym also reads fp16 zeros (0.625 B/weight); n/a without VNNI; "
             "x16 = QGemvX16Spec, the same weights interleaved 16 output rows per vector as the runtime loads them",
             "Q4_K / Q6_K = GemvSpec of the imported K-quant forms int4-g32-min-s256 (0.5 B codes + int8 scale and "
             "offset codes per 32 + fp16 d, dmin per 256: 0.578 B/weight) and int6-g16-sym-s256 (0.75 + 1/16 + "
             "2/256: 0.82 B/weight), batch 1 only; fp32 activations",
             peer_note]
    result = {"host": host, "llamacpp_build": build,
              "machine": {"cpu": target.mcpu, "cores": CORES, "threads": THREADS,
                          "python": platform.python_version(), "vector_bytes": target.vector_bytes},
              "read_bandwidth_gbs": host["read_bandwidth_gbs"], "rounds": rounds, "smoke": args.smoke,
              "rows": rows, "notes": notes, "headline_cell": head_name,
              "int4_gemv_fraction_of_bandwidth": of_bw("int4_gemv"),  # of the probe alongside
              "int4_gemv_i8a_fraction_of_bandwidth": {
                  key: of_bw(key) for key in ("int4_gemv_i8a", "int4_gemv_i8a_asym", "int4_gemv_x16",
                                              "int4_gemv_x16_asym") if key in head},
              # llama.cpp Q4_0 as llama.cpp runs it (repacked); both formats read 0.5625 B/weight
              "int4_gemv_vs_llamacpp_q4_0": ratio("int4_gemv", "llamacpp_q4_0"),
              # like for like: llama.cpp also quantizes the activations to int8 (Q8_0 blocks of 32)
              "int4_gemv_i8a_vs_llamacpp_q4_0": ratio("int4_gemv_i8a", "llamacpp_q4_0"),
              "int4_gemv_x16_vs_llamacpp_q4_0": ratio("int4_gemv_x16", "llamacpp_q4_0"),
              "llamacpp_q4_0_fraction_of_bandwidth": of_bw("llamacpp_q4_0"),
              "llamacpp_q8_0_fraction_of_bandwidth": of_bw("llamacpp_q8_0"),
              # the K-quant forms' GB/s over int4 g32's in the same rounds, per shape at batch 1
              "kquant_vs_int4_gemv": {f"{r['out']}x{r['in']}": {key: r[key]["gbs"] / r["int4_gemv"]["gbs"]
                                                                for key in FORMS if key in r}
                                      for r in rows if r["batch"] == 1 and "int4_gemv" in r}}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"# GEMV, {target.mcpu}, {THREADS} of {CORES} cores\n")
    print(f"- {host_line(host)}")
    print(f"- {llamacpp_line(build)}\n")
    print("| out x in | batch | bw alongside | ours int4 g32 | ours Q4_K | ours Q6_K | ours int8-act sym | "
          "ours int8-act asym | ours x16 sym | ours x16 asym | torch fp32 | ORT int4 acc4 | ORT int4 acc0 | "
          "llama.cpp Q4_0 | llama.cpp Q4_0 plain | llama.cpp Q8_0 |")
    print("|---" * (3 + len(COLUMNS)) + "|")
    for r in rows:
        cells = [(f"{r[key]['gbs']:.1f} GB/s ({r[key]['us']:.1f} us"
                  + (f", {100 * r[key]['of_bw']:.0f}%)" if "of_bw" in r[key] else ")")) if key in r else "n/a"
                 for key in COLUMNS]
        bw = f"{r['bw_gbs']:.1f} GB/s" if "bw_gbs" in r else "n/a"
        print(f"| {r['out']}x{r['in']} | {r['batch']} | {bw} | " + " | ".join(cells) + " |")
    print()
    for note in notes:
        print(f"- {note}")
    for key in ("int4_gemv", "int4_gemv_i8a", "int4_gemv_x16", "llamacpp_q4_0", "llamacpp_q8_0"):
        if of_bw(key) is not None:
            print(f"- {key} {head_name}: {100 * of_bw(key):.0f}% of the read bandwidth alongside")
    for shape, ratios in result["kquant_vs_int4_gemv"].items():
        print(f"- {shape} batch 1: " + ", ".join(f"{FORMS[key][0]} {v:.2f}x" for key, v in ratios.items())
              + " int4 g32's GB/s")
    for key in ("int4_gemv", "int4_gemv_i8a", "int4_gemv_x16"):
        if result[f"{key}_vs_llamacpp_q4_0"] is not None:
            print(f"- {key} {head_name}: {result[f'{key}_vs_llamacpp_q4_0']:.2f}x llama.cpp Q4_0 "
                  "(medians of the same interleaved rounds)")


if __name__ == "__main__":
    main()
