"""GEMV kernel benchmark: our int4 GEMV vs the machine's read bandwidth, torch fp32, onnxruntime int4 and
llama.cpp Q4_0 / Q8_0 (ggml CPU backend, from the venv of bench/peers/setup_llamacpp.sh; skipped with a
note saying why when that venv is missing)."""

from __future__ import annotations

import argparse
import gc
import json
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

CORES = len(os.sched_getaffinity(0))
THREADS = CORES  # set by --threads before anything imports tvm

SHAPES = ((4096, 4096), (11008, 4096), (576, 576), (192, 576), (1536, 576), (576, 1536))  # (out, in)
BATCHES = (1, 4, 16)
BITS, GROUP = 4, 32
MIN_BYTES = 256 << 20  # weight copies per measurement: more than this, so they come from DRAM
REPEATS = 7
LLAMACPP_COLUMNS = ("q4_0", "q4_0_plain", "q8_0")  # labels of bench/peers/llamacpp_matvec.CONFIGS


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


# ---------------------------------------------------------------------------------------------
# bitsmith (TVM)


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


def read_bandwidth(gib: float = 1.0, huge: bool = True) -> float:
    """GB/s of a multithreaded TVM row-sum (fp32 GEMV with x = 1) over a buffer far larger than L3."""
    import tvm

    from bitsmith.codegen.gemv import GemvSpec
    from bitsmith.codegen.kernel import build_module

    cols = 4096
    rows = int(gib * (1 << 30)) // (cols * 4)
    spec = GemvSpec(rows, cols, 32, batch=1)
    func = build_module([spec])[spec.name]
    if huge:
        w = tvm_tensor(hugepage_copies(1, (rows, cols), np.float32)[0])
    else:  # TVM's own allocation (posix_memalign, 4 KiB pages)
        w = tvm.runtime.empty((rows, cols), "float32")
    w.copyfrom(np.ones((rows, cols), np.float32))
    args = [tvm_tensor(np.ones((1, cols), np.float32)), w, tvm_tensor(np.zeros((1, rows), np.float32))]
    sec = timed(lambda _: func(*args), 1, 5)
    del args, w
    gc.collect()
    return rows * cols * 4 / sec / 1e9


def bench_ours(shapes: tuple, batches: tuple) -> dict[tuple[int, int, int], float]:
    """Seconds per int4 g32 sym GEMV call (Python call overhead subtracted)."""
    from bitsmith.codegen.gemv import GemvSpec
    from bitsmith.codegen.kernel import build_module, call_kernel
    from bitsmith.compiler.ops.quant import dequantize_packed

    specs = [GemvSpec(n, k, BITS, GROUP, True, b) for n, k in shapes for b in batches]
    tiny = GemvSpec(1, 16, 32)
    module = build_module(specs + [tiny])
    overhead = tvm_call_overhead(module[tiny.name])
    rng = np.random.default_rng(0)
    out: dict[tuple[int, int, int], float] = {}
    for n, k in shapes:
        spec0 = GemvSpec(n, k, BITS, GROUP, True, 1)
        copies = copies_for(spec0.weight_bytes())
        wshape = spec0.weight_shape()
        # random words are valid packed 4-bit codes in any layout
        qw = hugepage_copies(copies, wshape, np.uint32)
        sc = hugepage_copies(copies, (n, spec0.n_groups), np.float16)
        for c in range(copies):
            qw[c][:] = rng.integers(0, 1 << 32, wshape, dtype=np.uint32)
            sc[c][:] = (rng.random(sc[c].shape) * 0.02).astype(np.float16)
        weights = [(tvm_tensor(qw[c]), tvm_tensor(sc[c])) for c in range(copies)]
        for b in batches:
            spec = GemvSpec(n, k, BITS, GROUP, True, b)
            x = rng.standard_normal((b, k)).astype(np.float32)
            attrs = {"bits": BITS, "group_size": GROUP, "in_features": k, "sym": True}
            ref = x @ dequantize_packed(qw[0], sc[0], None, attrs).T
            y = call_kernel(spec, [x, qw[0], sc[0]], [np.empty((b, n), np.float32)], module)[0]
            err = np.abs(y - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f"{spec.name}: relative error {err:.2e}"
            xt, yt = tvm_tensor(x), tvm_tensor(np.zeros((b, n), np.float32))
            func = module[spec.name]
            sec = timed(lambda c: func(xt, *weights[c], yt), copies)
            out[(n, k, b)] = max(sec - overhead, 1e-9)
        del weights, qw, sc
        gc.collect()
    out[("overhead",)] = overhead  # type: ignore[index]
    return out


def bench_ours_int8(shapes: tuple, batches: tuple, interleaved: bool = False) -> dict[Any, float]:
    """Seconds per int8-activation VNNI GEMV call (QGemvI8Spec: int4 g32, the same packed weights; with
    `interleaved` QGemvX16Spec on those weights as the runtime interleaves them at load), keyed (sym, out,
    in, batch), and under ("bw", sym, out, in, batch) the read bandwidth measured in rounds alternating with
    that kernel (this shared machine drifts 2x within minutes, so a bandwidth taken once at the start says
    little about a kernel timed minutes later). Medians of 3 rounds; call overhead subtracted; empty when
    the host lacks AVX-512 VNNI."""
    from bitsmith.codegen.gemv import GemvSpec
    from bitsmith.codegen.gemv_int8 import QGemvI8Spec
    from bitsmith.codegen.gemv_x16 import QGemvX16Spec
    from bitsmith.codegen.kernel import build_module
    from bitsmith.compiler.ops.quant import dequantize_packed
    from bitsmith.codegen.target import host_target
    from bitsmith.runtime.interleave import kernel_weight, x16_name

    if not host_target().supports_int8_activations:
        return {}
    family = QGemvX16Spec if interleaved else QGemvI8Spec
    specs = [family(n, k, BITS, GROUP, sym, b) for sym in (True, False) for n, k in shapes for b in batches]
    tiny, probe_spec = GemvSpec(1, 16, 32), GemvSpec(MIN_BYTES // (4096 * 4), 4096, 32)  # probe: as read_bandwidth
    module = build_module(specs + [tiny, probe_spec])
    overhead = tvm_call_overhead(module[tiny.name])
    probe_w = hugepage_copies(1, probe_spec.weight_shape(), np.float32)[0]
    probe_w[:] = 1
    probe_args = [tvm_tensor(np.ones((1, 4096), np.float32)), tvm_tensor(probe_w),
                  tvm_tensor(np.zeros((1, probe_spec.out_features), np.float32))]
    probe = module[probe_spec.name]
    rng = np.random.default_rng(3)
    out: dict[Any, float] = {}
    for n, k in shapes:
        spec0 = QGemvI8Spec(n, k, BITS, GROUP, False, 1)
        copies = copies_for(spec0.weight_bytes())
        qw = hugepage_copies(copies, spec0.weight_shape(), np.uint32)
        sc = hugepage_copies(copies, (n, spec0.n_groups), np.float16)
        zs = hugepage_copies(copies, (n, spec0.n_groups), np.float16)
        for c in range(copies):
            qw[c][:] = rng.integers(0, 1 << 32, spec0.weight_shape(), dtype=np.uint32)
            sc[c][:] = (rng.random(sc[c].shape) * 0.02).astype(np.float16)
            zs[c][:] = (rng.random(zs[c].shape) * 15).astype(np.float16)
        layout = [qw, sc, zs]
        if interleaved:  # the same weights as the runtime lays them out (flat arrays, huge pages again)
            names = [x16_name("q", BITS, k), x16_name("s"), x16_name("z")]
            layout = []
            for name, src in zip(names, (qw, sc, zs)):
                first = kernel_weight(name, {name.split("@")[0]: src[0]})
                dst = hugepage_copies(copies, first.shape, first.dtype)
                for c in range(copies):
                    dst[c][:] = kernel_weight(name, {name.split("@")[0]: src[c]})
                layout.append(dst)
        for sym in (True, False):
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
                secs, bws = [], []
                for _ in range(3):
                    bws.append(probe_spec.weight_bytes() / timed(lambda _: probe(*probe_args), 1, 3) / 1e9)
                    secs.append(timed(lambda c: func(xt, *weights[c], yt), copies, 3))
                out[(sym, n, k, b)] = max(statistics.median(secs) - overhead, 1e-9)
                out[("bw", sym, n, k, b)] = statistics.median(bws)
            del weights
        del qw, sc, zs, layout
        gc.collect()
    return out


# ---------------------------------------------------------------------------------------------
# peers


def bench_torch(shapes: tuple, batches: tuple) -> dict[Any, float]:
    """Seconds per torch fp32 F.linear (call overhead subtracted)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(THREADS)
    out: dict[Any, float] = {}
    with torch.inference_mode():
        tx, tw = torch.zeros(1, 16), torch.zeros(1, 16)
        overhead = timed(lambda _: F.linear(tx, tw), 2000, 5)
        for n, k in shapes:
            copies = copies_for(n * k * 4)
            arena = hugepage_copies(copies, (n, k), np.float32)
            w0 = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
            for a in arena:
                a[:] = w0
            ws = [torch.from_numpy(a) for a in arena]
            for b in batches:
                x = torch.randn(b, k)
                out[(n, k, b)] = max(timed(lambda c: F.linear(x, ws[c]), copies) - overhead, 1e-9)
            del ws, arena
            gc.collect()
    out[("overhead",)] = overhead
    return out


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


def bench_ort(shapes: tuple, batches: tuple, accuracy: int) -> dict[Any, float]:
    """Seconds per MatMulNBits: one session runs `copies` nodes, so the Python call is amortized."""
    rng = np.random.default_rng(2)
    out: dict[Any, float] = {}
    for n, k in shapes:
        copies = copies_for(n * k // 2 + n * (k // GROUP) * 4)
        sess = ort_model(n, k, copies, accuracy, rng)
        for b in batches:
            feed = {"A": rng.standard_normal((b, k)).astype(np.float32)}
            out[(n, k, b)] = timed(lambda _: sess.run(None, feed), 1) / copies
        del sess
        gc.collect()
    return out


def bench_llamacpp(shapes: tuple, batches: tuple) -> tuple[dict[Any, dict[str, Any]], str]:
    """llama.cpp mat-vec rows {(label, out, in, batch): row} (bench/peers/llamacpp_matvec.py), and a note.

    The rows are empty and the note says why when the peer venv is missing or its helper fails.
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent / "peers"))
    try:
        import llamacpp_matvec as peer
    finally:
        sys.path.pop(0)
    try:
        res = peer.bench(shapes, batches, threads=THREADS, min_mb=MIN_BYTES / (1 << 20))
    except (peer.PeerUnavailable, OSError, subprocess.SubprocessError) as exc:
        return {}, f"llama.cpp: skipped: {exc}"
    row = next(iter(res.values()))
    version = peer.peer_env().get("LLAMACPP_VERSION", "?")
    policies = sorted({r["omp_wait_policy"] for r in res.values()})
    return res, (f"llama.cpp (llama-cpp-python {version}, ggml CPU backend built with OpenMP, {row['threads']} "
                 "threads, one graph of mul_mat nodes over all copies): Q4_0 = weights in the CPU_REPACK buffer "
                 "(llama.cpp's default on AVX2/AVX-512: q4_0_8x8), Q4_0 plain = ggml_vec_dot_q4_0_q8_0 / llamafile "
                 "sgemm; Q4_0 18 B and Q8_0 34 B per 32 weights; activations quantized to Q8_0 inside each mul_mat; "
                 "each cell the faster of OMP_WAIT_POLICY passive and unset (GOMP's spinning barriers collapse "
                 "under any other load on 2 vCPUs; the spinning run is dropped if it takes 4x as long as the "
                 f"passive one; winners here: {', '.join(policies)})")


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    parser.add_argument("--quick", action="store_true", help="4096x4096 and 576x576 at batch 1 only")
    parser.add_argument("--threads", type=int, default=CORES, help="threads for every implementation")
    args = parser.parse_args()
    global THREADS
    THREADS = args.threads
    # TVM's pool defaults to hardware_concurrency / 2 threads (1 on a 2-vCPU VM); read at first use
    os.environ["TVM_NUM_THREADS"] = str(THREADS)
    shapes, batches = ((SHAPES[0], SHAPES[2]), (1,)) if args.quick else (SHAPES, BATCHES)

    from bitsmith.codegen.target import host_target

    target = host_target()
    log("read bandwidth")
    bw = {"huge_pages": read_bandwidth(huge=True), "4k_pages": read_bandwidth(huge=False)}
    log("bitsmith int4")
    ours = bench_ours(shapes, batches)
    log("bitsmith int4, int8 activations (VNNI)")
    ours8 = bench_ours_int8(shapes, batches)
    log("bitsmith int4, int8 activations, 16-row interleaved layout")
    ours16 = bench_ours_int8(shapes, batches, interleaved=True)
    log("torch fp32")
    torch_t = bench_torch(shapes, batches)
    log("onnxruntime int4, accuracy_level 4 and 0")
    ort4 = bench_ort(shapes, batches, 4)
    ort0 = bench_ort(shapes, batches, 0)
    log("llama.cpp Q4_0 / Q8_0")
    lcpp, lcpp_note = bench_llamacpp(shapes, batches)

    rows = []
    for n, k in shapes:
        for b in batches:
            ours_bytes = n * k // 2 + n * (k // GROUP) * 2  # packed codes + fp16 scales
            ort_bytes = n * k // 2 + n * (k // GROUP) * 4  # packed codes + fp32 scales
            row = {"out": n, "in": k, "batch": b,
                   "int4_gemv": (ours[(n, k, b)], ours_bytes), "torch_fp32": (torch_t[(n, k, b)], n * k * 4),
                   "ort_int4_acc4": (ort4[(n, k, b)], ort_bytes), "ort_int4_acc0": (ort0[(n, k, b)], ort_bytes)}
            for sym in (True, False):  # asym also reads fp16 zeros
                for family, times in (("int4_gemv_i8a", ours8), ("int4_gemv_x16", ours16)):
                    if (sym, n, k, b) in times:
                        key = family + ("" if sym else "_asym")
                        row[key] = (times[(sym, n, k, b)], ours_bytes + (0 if sym else n * (k // GROUP) * 2))
                        row[f"{key}_bw_gbs"] = times[("bw", sym, n, k, b)]  # read bandwidth measured alongside
            for label in LLAMACPP_COLUMNS:
                if (label, n, k, b) in lcpp:
                    peer_row = lcpp[(label, n, k, b)]
                    row[f"llamacpp_{label}"] = (peer_row["sec"], peer_row["weight_bytes"])
            rows.append({key: ({"us": v[0] * 1e6, "gbs": v[1] / v[0] / 1e9} if isinstance(v, tuple) else v)
                         for key, v in row.items()})
    peak = bw["huge_pages"]
    head = next(r for r in rows if (r["out"], r["in"], r["batch"]) == (4096, 4096, 1))
    notes = ["GB/s = weight bytes read per call / time (ours: codes + fp16 scales, 0.5625 B/weight; "
             "onnxruntime: codes + fp32 scales, 0.625 B/weight; torch: 4 B/weight); int4 g32 symmetric",
             f"Python call overhead subtracted: TVM {ours[('overhead',)] * 1e6:.1f} us, "
             f"torch {torch_t[('overhead',)] * 1e6:.1f} us; onnxruntime runs all copies in one session.run",
             "ours int8-act = QGemvI8Spec: the same int4 weights, x quantized per 32 values to int8 in the kernel, "
             "u8 x s8 vpdpbusd (AVX-512 VNNI); asym also reads fp16 zeros (0.625 B/weight); n/a without VNNI; "
             "its % is of the read bandwidth measured in rounds alternating with it (bench_ours_int8); "
             "x16 = QGemvX16Spec, the same weights interleaved 16 output rows per vector as the runtime loads them",
             lcpp_note]
    result = {"machine": {"cpu": target.mcpu, "cores": CORES, "threads": THREADS,
                          "python": platform.python_version(), "vector_bytes": target.vector_bytes},
              "read_bandwidth_gbs": bw, "rows": rows, "notes": notes,
              "int4_gemv_fraction_of_bandwidth": head["int4_gemv"]["gbs"] / peak,
              "int4_gemv_i8a_fraction_of_bandwidth": {  # of the bandwidth measured alongside
                  key: head[key]["gbs"] / head[f"{key}_bw_gbs"]
                  for key in ("int4_gemv_i8a", "int4_gemv_i8a_asym", "int4_gemv_x16", "int4_gemv_x16_asym") if key in head},
              # llama.cpp Q4_0 as llama.cpp runs it (repacked); both formats read 0.5625 B/weight
              "int4_gemv_vs_llamacpp_q4_0": (head["int4_gemv"]["gbs"] / head["llamacpp_q4_0"]["gbs"]
                                             if "llamacpp_q4_0" in head else None),
              # like for like: llama.cpp also quantizes the activations to int8 (Q8_0 blocks of 32)
              "int4_gemv_i8a_vs_llamacpp_q4_0": (head["int4_gemv_i8a"]["gbs"] / head["llamacpp_q4_0"]["gbs"]
                                                 if "llamacpp_q4_0" in head and "int4_gemv_i8a" in head else None),
              "llamacpp_q4_0_fraction_of_bandwidth": (head["llamacpp_q4_0"]["gbs"] / peak
                                                      if "llamacpp_q4_0" in head else None),
              "llamacpp_q8_0_fraction_of_bandwidth": (head["llamacpp_q8_0"]["gbs"] / peak
                                                      if "llamacpp_q8_0" in head else None)}
    if args.json:
        print(json.dumps(result, indent=1))
        return
    print(f"# GEMV, {target.mcpu}, {THREADS} of {CORES} cores; read bandwidth {peak:.1f} GB/s (huge pages), "
          f"{bw['4k_pages']:.1f} GB/s (4 KiB pages)\n")
    columns = ("int4_gemv", "int4_gemv_i8a", "int4_gemv_i8a_asym", "int4_gemv_x16", "int4_gemv_x16_asym",
               "torch_fp32", "ort_int4_acc4", "ort_int4_acc0") + tuple(f"llamacpp_{label}" for label in LLAMACPP_COLUMNS)
    print("| out x in | batch | ours int4 g32 | % of bw | ours int8-act sym (% of bw alongside) | "
          "ours int8-act asym (% of bw alongside) | ours x16 sym (% of bw alongside) | ours x16 asym (% of bw alongside) "
          "| torch fp32 | ORT int4 acc4 | ORT int4 acc0 | llama.cpp Q4_0 | llama.cpp Q4_0 plain | llama.cpp Q8_0 |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[key]['gbs']:.1f} GB/s ({r[key]['us']:.1f} us"
                 + (f", {100 * r[key]['gbs'] / r[key + '_bw_gbs']:.0f}% of {r[key + '_bw_gbs']:.1f})"
                    if key + "_bw_gbs" in r else ")") if key in r else "n/a" for key in columns]
        print(f"| {r['out']}x{r['in']} | {r['batch']} | {cells[0]} | {100 * r['int4_gemv']['gbs'] / peak:.0f}% | "
              + " | ".join(cells[1:]) + " |")
    print()
    for note in notes:
        print(f"- {note}")
    fraction = result["int4_gemv_fraction_of_bandwidth"]
    print(f"- int4 GEMV 4096x4096 batch 1: {100 * fraction:.0f}% of the read bandwidth")
    for key, frac in result["int4_gemv_i8a_fraction_of_bandwidth"].items():
        print(f"- {key} 4096x4096 batch 1: {100 * frac:.0f}% of the read bandwidth measured alongside")
    if result["int4_gemv_vs_llamacpp_q4_0"] is not None:
        print(f"- int4 GEMV 4096x4096 batch 1: {result['int4_gemv_vs_llamacpp_q4_0']:.2f}x llama.cpp Q4_0 "
              f"(llama.cpp Q4_0 {100 * result['llamacpp_q4_0_fraction_of_bandwidth']:.0f}%, "
              f"Q8_0 {100 * result['llamacpp_q8_0_fraction_of_bandwidth']:.0f}% of the read bandwidth)")
    if result["int4_gemv_i8a_vs_llamacpp_q4_0"] is not None:
        print(f"- int4_gemv_i8a 4096x4096 batch 1: {result['int4_gemv_i8a_vs_llamacpp_q4_0']:.2f}x llama.cpp Q4_0")


if __name__ == "__main__":
    main()
