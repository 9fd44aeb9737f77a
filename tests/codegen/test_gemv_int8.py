"""Int8-activation VNNI GEMV (QGemvI8Spec) against two numpy oracles.

1. Exact: the same activation quantization (per 32 values: sx = max|x| / 127, xq = rint(x / sx) via
   x * (127 / max|x|) in fp32), integer dot products per 32-block, then fp64 scaling. The kernel differs
   only by fp32 rounding in the scaling and summation: |y - ref| <= 1e-5 max|ref|.
2. fp32: x @ dequant(W).T. The kernel differs by the activation quantization error, which is bounded per
   output: |x_k - sx xq_k| <= sx / 2, so |y - ref| <= sum_k |W_ok| sx_k / 2 (+ 1e-5 max|ref| rounding).
"""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.kernel import build_module
from bitsmith.codegen.target import Target, cross_target, host_target
from bitsmith.compiler.ops.quant import dequantize_packed
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import pack
from bitsmith.runtime.packed_layout import unpack

pytestmark = pytest.mark.skipif(not host_target().supports_int8_activations, reason="host lacks AVX-512 VNNI")

GROUPS = (32, 64, 128, -1)
# (out, in): 576 = 4 full int4 blocks + a 64-value tail (8 lanes, VNNI); 200 = 1 block + 72 values, not a
# multiple of the group (scalar tail); 1536 whole blocks
SPECS = [QGemvI8Spec(n, k, b, g, sym, bs) for b in (4, 8) for g in GROUPS for sym in (True, False)
         for n, k, bs in ((7, 576, 1), (33, 200, 1), (576, 1536, 3))]
SPECS += [
    QGemvI8Spec(1, 576, 4, 32, True, 1), QGemvI8Spec(1536, 576, 4, 32, True, 1),
    QGemvI8Spec(576, 576, 4, 32, False, 4), QGemvI8Spec(1, 4096, 4, 128, False, 1),
    QGemvI8Spec(33, 4096, 4, 32, True, 16),  # 4 passes over the rows (L1 chunks), last one partial
    QGemvI8Spec(7, 4168, 4, 64, False, 16),  # passes + scalar tail
    QGemvI8Spec(64, 4096, 8, 128, True, 16), QGemvI8Spec(2, 4096, 4, -1, False, 9),
    QGemvI8Spec(5, 37, 4, -1, False, 2),  # tail only
    QGemvI8Spec(3, 160, 4, 32, True, 1), QGemvI8Spec(3, 150, 4, 32, False, 1),  # 4-lane VNNI tails
    QGemvI8Spec(3, 96, 8, 32, False, 1), QGemvI8Spec(3, 80, 8, 64, True, 1),  # int8 8- and 4-lane tails
    # chunks of 4 transposed blocks (batch >= 2): with leftover blocks, passes, y in 16-output blocks
    QGemvI8Spec(48, 576, 8, 32, True, 16), QGemvI8Spec(32, 1536, 4, 64, False, 64),
    QGemvI8Spec(16, 4160, 4, -1, False, 5), QGemvI8Spec(9, 1024, 8, 128, True, 2),
    QGemvI8Spec(64, 640, 4, 128, True, 24),
    # two output rows per iteration (rows of 2+ chunks, 4..32 batch rows): with a paired 8-lane tail, asym,
    # int8 with a leftover block, several passes
    QGemvI8Spec(32, 1088, 4, 32, True, 16), QGemvI8Spec(48, 1536, 4, 64, False, 4),
    QGemvI8Spec(32, 576, 8, 32, False, 32), QGemvI8Spec(16, 2048, 4, 128, True, 32),
    # paired tails (8 lanes: 576 = 4 blocks + 64; 4 lanes: 160 = 1 block + 32), sym and asym, 2..64 rows:
    # a sym tail's zero-point term starts one lane per column, an asym one every lane
    *[QGemvI8Spec(n, k, 4, g, sym, bs) for n, k, g, bs in ((192, 576, 32, 2), (48, 576, 64, 16), (32, 160, 32, 4),
                                                           (16, 576, 128, 64)) for sym in (True, False)],
]
# in < 128 (int4: no full block, tail only) with outputs in blocks of 16: the tail's sums once reached y as
# zeros (issue 20: 64x112, 16x96, 16x80, per-channel 16x48 at 1..4 rows); sym and asym, vector and scalar tails
NARROW_SPECS = [QGemvI8Spec(n, k, 4, g, sym, bs) for n, k, g, bs in (
    (64, 112, 32, 1), (64, 112, 32, 2), (64, 112, 32, 4), (16, 96, 32, 1), (16, 96, 32, 3), (16, 80, 32, 1),
    (16, 48, -1, 1), (16, 32, 32, 1), (32, 64, 64, 8)) for sym in (True, False)]
# int8 (64-value blocks): 48 has none (it failed too), 112 one block and a scalar tail
NARROW_SPECS += [QGemvI8Spec(16, 48, 8, -1, True, 1), QGemvI8Spec(16, 112, 8, 32, False, 2)]
SPECS += NARROW_SPECS


@pytest.fixture(scope="module")
def module(host_kernels):
    """Every kernel of this file in one library, built through the kernel cache."""
    return host_kernels(SPECS)


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(int codes [batch, in padded to 32], fp32 scales [batch, in / 32]) exactly as the kernel."""
    batch, n_in = x.shape
    blocks = -(-n_in // 32)
    xp = np.zeros((batch, blocks * 32), np.float32)
    xp[:, :n_in] = x
    amax = np.abs(xp).reshape(batch, blocks, 32).max(-1)
    sx = amax / np.float32(127)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.clip(np.rint(xp * np.repeat(inv, 32, axis=1)), -127, 127).astype(np.int64)
    return xq, sx.astype(np.float32)


def exact_reference(spec: QGemvI8Spec, x, qweight, scales, zeros) -> np.ndarray:
    xq, sx = quantize_activations(x)
    blocks = sx.shape[1]
    q = np.zeros((spec.out_features, blocks * 32), np.int64)
    q[:, :spec.in_features] = unpack(qweight, spec.bits, spec.in_features)
    dot = np.einsum("obk,nbk->nob", q.reshape(-1, blocks, 32), xq.reshape(-1, blocks, 32))  # exact integers
    xsum = xq.reshape(-1, blocks, 32).sum(-1)
    g = np.arange(blocks) * 32 // spec.group
    s = scales.astype(np.float64)[:, g]
    z = float(1 << (spec.bits - 1)) if zeros is None else zeros.astype(np.float64)[:, g]
    return (sx[:, None, :] * s[None] * (dot - z * xsum[:, None, :])).sum(-1)


def case(spec: QGemvI8Spec, seed: int = 0):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << spec.bits, (spec.out_features, spec.in_features), dtype=np.uint8)
    scales = (rng.random((spec.out_features, spec.n_groups)) * 0.05 + 0.005).astype(np.float16)
    zeros = None if spec.sym else (rng.random((spec.out_features, spec.n_groups)) * ((1 << spec.bits) - 1)
                                   ).astype(np.float16)
    x = rng.standard_normal((spec.batch, spec.in_features)).astype(np.float32)
    x[:, ::97] *= 20  # outliers
    x[0, :min(32, spec.in_features)] = 0  # an all-zero block: sx = 0
    return x, pack(q, spec.bits), scales, zeros


def run(module, spec: QGemvI8Spec, x, qweight, scales, zeros) -> np.ndarray:
    import tvm

    args = [x, qweight, scales] + ([] if zeros is None else [zeros])
    out = tvm.runtime.tensor(np.full((spec.batch, spec.out_features), np.nan, np.float32))
    module[spec.name](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args], out)
    return out.numpy()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_matches_the_exact_int8_reference_and_the_fp32_bound(module, spec):
    x, qweight, scales, zeros = case(spec)
    y = run(module, spec, x, qweight, scales, zeros)
    ref = exact_reference(spec, x, qweight, scales, zeros)
    scale = float(np.abs(ref).max())
    assert y.dtype == np.float32 and np.isfinite(y).all()
    assert float(np.abs(y - ref).max()) <= 1e-5 * scale

    attrs = {"bits": spec.bits, "group_size": spec.group_size, "in_features": spec.in_features, "sym": spec.sym}
    w = dequantize_packed(qweight, scales, zeros, attrs)
    fref = x.astype(np.float64) @ w.T.astype(np.float64)
    _, sx = quantize_activations(x)
    bound = np.abs(w).astype(np.float64) @ np.repeat(sx, 32, axis=1)[:, :spec.in_features].T / 2  # [out, batch]
    assert (np.abs(y - fref) <= bound.T + 1e-5 * scale).all()


def test_typical_error_against_fp32_is_well_under_the_bound(module):
    spec = QGemvI8Spec(576, 1536, 4, 32, True, 3)
    x, qweight, scales, zeros = case(spec, seed=1)
    x = np.random.default_rng(2).standard_normal(x.shape).astype(np.float32)  # plain Gaussian activations
    y = run(module, spec, x, qweight, scales, zeros)
    w = dequantize_packed(qweight, scales, zeros, {"bits": 4, "group_size": 32, "in_features": 1536, "sym": True})
    fref = x @ w.T
    rel = np.linalg.norm(y - fref) / np.linalg.norm(fref)
    assert rel < 0.02, rel  # ~0.6-1% for int8 per-32 activations


def test_arguments_and_names_match_the_fp32_activation_kernel():
    for sym in (True, False):
        spec = QGemvI8Spec(1536, 576, 4, 32, sym, 1)
        func = spec.prim_func(host_target())
        names = [p.name for p in func.params]
        assert names == ["x", "qweight", "scales"] + ([] if sym else ["zeros"]) + ["y"]
        assert spec.weight_shape() == spec.gemv.weight_shape() and spec.weight_bytes() == spec.gemv.weight_bytes()
        assert isinstance(spec.gemv, GemvSpec)
    assert QGemvI8Spec(64, 576, 4, 32, True, 64).gemv.rows == 64  # past GemvSpec's rows: the GEMM
    assert QGemvI8Spec(1536, 576, 4, 32, True, 1).name == "qgemv_i8a_b4_g32_sym_n1536_k576_bs1"
    assert QGemvI8Spec(7, 37, 8, -1, False, 4).name == "qgemv_i8a_b8_gch_asym_n7_k37_bs4"


def test_kernel_uses_vnni_on_zmm(module):
    asm = build_module([QGemvI8Spec(64, 576, 4, 32, True, 1)], "host").mod.inspect_source("asm")
    assert "vpdpbusd" in asm and "zmm" in asm


@pytest.mark.parametrize("kwargs", [dict(bits=3), dict(bits=2), dict(bits=4, group_size=48),
                                    dict(bits=4, batch=65), dict(bits=16)])
def test_unsupported_specs_are_refused(kwargs):
    with pytest.raises(BitsmithError, match="int8-activation GEMV"):
        QGemvI8Spec(64, 576, **kwargs)


def test_targets_without_vnni_are_refused_so_lowering_can_fall_back():
    arm = cross_target("aarch64-linux")
    avx2 = Target("x86-avx2", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell", "num-cores": 2}, 32, 2)
    assert host_target().supports_int8_activations and "int8" in host_target().activations
    for target in (arm, avx2):
        assert not target.supports_int8_activations and target.activations == ("float32",)
        lacks = "the dot-product extension" if target is arm else "AVX-512 VNNI"  # generic aarch64: no sdot
        with pytest.raises(BitsmithError, match=f"lacks {lacks}"):
            QGemvI8Spec(64, 576, 4, 32, True, 1).prim_func(target)
