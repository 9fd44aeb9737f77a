"""Cost model from our own kernels: measured GEMV latency per (shape, scheme) on the target, exact bytes per scheme."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import tvm

from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.kernel import build_module
from bitsmith.codegen.target import host_target
from bitsmith.runtime.quant_scheme import parse_scheme, theoretical_bytes
from bitsmith.runtime.packed_layout import packed_shape
from bitsmith.search.sensitivity import KEEP16

ROTATE_BYTES = 64 << 20  # weight copies per measurement: more than the caches, as in real decode


def tensor_bytes(out_f: int, in_f: int, scheme: str) -> int:
    """Bytes the packing pass writes for one weight: codes + fp16 scales (and zeros), or fp16 dense."""
    if scheme == KEEP16:
        return 2 * out_f * in_f
    return int(np.ceil(theoretical_bytes(out_f, in_f, parse_scheme(scheme))))


def _spec(out_f: int, in_f: int, scheme: str, batch: int):
    if scheme == KEEP16:
        return GemvSpec(out_f, in_f, 16, batch=batch)
    s = parse_scheme(scheme)
    return GemvSpec(out_f, in_f, s.bits, s.group_size, s.sym, batch)


def _time_kernel(spec) -> float:
    """Median seconds per call over copies of random weights large enough to come from DRAM."""
    module = build_module([spec], "host")
    func = module[spec.name]
    dev = tvm.cpu(0)
    rng = np.random.default_rng(0)
    if spec.is_quantized:
        w = rng.integers(0, 2 ** 32, size=packed_shape(spec.out_features, spec.in_features, spec.bits), dtype=np.uint32)
        params = [w, (rng.random((spec.out_features, spec.n_groups)) * 0.01).astype(np.float16)]
        if not spec.sym:
            params.append(np.full((spec.out_features, spec.n_groups), 8, np.float16))
    else:
        params = [rng.standard_normal((spec.out_features, spec.in_features)).astype(np.float16)]
    per_copy = sum(p.nbytes for p in params)
    copies = max(1, min(4096, ROTATE_BYTES // per_copy))
    tensors = [[tvm.runtime.tensor(p, dev) for p in params] for _ in range(copies)]
    x = tvm.runtime.tensor(rng.standard_normal((spec.batch, spec.in_features)).astype(np.float32), dev)
    y = tvm.runtime.tensor(np.zeros((spec.batch, spec.out_features), np.float32), dev)
    runs = []
    for _ in range(5):
        t0 = time.perf_counter()
        for params_i in tensors:
            func(x, *params_i, y)
        runs.append((time.perf_counter() - t0) / copies)
    return statistics.median(runs)


def online_rotation_bytes(module, batch: int) -> int:
    """Bytes one decode step's online rotations move: the `hadamard` ops rotate_ffn_online puts before down_proj
    and rotate_keys_online on q/k after RoPE (none in an unrotated model). Each reads and writes its activation once
    per sequence of the step (`batch` of them) and reads its factor weight, if any, once."""
    fn = module["decode"]
    total = 0
    for node in fn.nodes:
        if node.op != "hadamard":
            continue
        x = fn.types[node.inputs[0]]
        per_token = int(np.prod(x.shape[1:])) * np.dtype(x.dtype).itemsize  # axis 0: the decode step's row
        total += 2 * batch * per_token
        if len(node.inputs) == 2:
            factor = fn.types[node.inputs[1]]
            total += int(np.prod(factor.shape)) * np.dtype(factor.dtype).itemsize
    return total


class LatencyTable:
    """seconds per GEMV call, measured once per (shape, scheme, batch) and target CPU, cached as JSON."""

    def __init__(self, cache_dir: Path | None) -> None:
        target = host_target()
        self.path = cache_dir / f"latency-{target.mcpu}-{target.num_cores}c.json" if cache_dir else None
        self.table: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            self.table = json.loads(self.path.read_text())

    def seconds(self, out_f: int, in_f: int, scheme: str, batch: int) -> float:
        spec = _spec(out_f, in_f, scheme, batch)
        key = f"{spec.name}@threads{os.environ.get('TVM_NUM_THREADS', 'all')}"
        if key not in self.table:
            self.table[key] = _time_kernel(spec)
            self._save()
        return self.table[key]

    def bytes_per_second(self, out_f: int, in_f: int) -> float:
        """The bandwidth a one-row 16-bit GEMV of that shape reaches (its weight bytes over its measured time): what
        bytes moved outside the GEMVs cost per second."""
        return tensor_bytes(out_f, in_f, KEEP16) / self.seconds(out_f, in_f, KEEP16, 1)

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.table, indent=0, sort_keys=True))
        tmp.replace(self.path)
