"""Prefill dequant-GEMM kernels against the numpy oracle (x @ dequantize_packed(...).T), and their build."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitsmith.codegen import families
from bitsmith.codegen.gemm import GemmSpec, tile_rows
from bitsmith.codegen.kernel import build_module
from bitsmith.codegen.target import host_target
from bitsmith.errors import BitsmithError
from conftest import assert_close_to_scale, packed_matmul_case
from test_gemv import run_matmul

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
# (out, in): out 1 / 7 (below one register block), 576, 1536 (padded and exact tiles); in 576 (a
# partial last group at g128 and a packed tail block), 200 (odd tail lanes), 1536, 37 (tail only)
SHAPES = ((576, 576), (7, 200), (1536, 576), (1, 576), (7, 37), (576, 1536), (33, 200))
ROWS = (16, 32, 64)
# every bits x group x sym once, shapes and rows taken round-robin so each meets every bit width
QUANT_SPECS = [GemmSpec(n, k, b, g, sym, r) for (b, g, sym), (n, k), r in zip(
    itertools.product(BITS, GROUPS, (True, False)), itertools.cycle(SHAPES), itertools.cycle(ROWS))]
QUANT_SPECS += [GemmSpec(576, 576, 4, 128, True, r) for r in ROWS]  # SmolLM2 shapes, every row count
QUANT_SPECS += [GemmSpec(192, 576, 4, 32, True, 64), GemmSpec(1536, 576, 4, 32, False, 32),
                GemmSpec(33, 200, 4, 32, True, 5), GemmSpec(7, 576, 3, 64, False, 40),  # rows not whole vectors
                GemmSpec(50, 200, 8, -1, True, 128)]
DENSE_SPECS = [GemmSpec(n, k, bits, rows=r) for bits in (16, 32) for (n, k), r in zip(
    ((576, 576), (7, 200), (1536, 576), (1, 200), (7, 37), (100, 1536)), itertools.cycle(ROWS))]
DENSE_SPECS += [GemmSpec(200, 576, 16, rows=3)]
RTOL = 1e-4  # of max|y|: fp32 accumulation in another order than numpy's


@pytest.fixture(scope="module")
def module(host_kernels):
    """Every kernel of this file in one library, built through the kernel cache."""
    return host_kernels(QUANT_SPECS + DENSE_SPECS)


def _quant_case(spec: GemmSpec, seed: int = 0):
    return packed_matmul_case(spec, spec.rows, seed)


def _close(y: np.ndarray, ref: np.ndarray) -> None:
    assert_close_to_scale(y, ref, RTOL)


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: s.name)
def test_quantized_gemm_matches_oracle(module, spec):
    x, qweight, scales, zeros, ref = _quant_case(spec)
    _close(run_matmul(spec, x, qweight, scales, zeros, module), ref)


@pytest.mark.parametrize("spec", DENSE_SPECS, ids=lambda s: s.name)
def test_dense_gemm_matches_numpy(module, spec):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(spec.weight_shape()).astype(np.float32 if spec.bits == 32 else np.float16)
    x = rng.standard_normal((spec.rows, spec.in_features)).astype(np.float32)
    _close(run_matmul(spec, x, w, module=module), x @ w.astype(np.float32).T)


def test_gemm_agrees_with_the_gemv_on_the_same_weights(module):
    """Prefill (GEMM) and decode (GEMV) kernels read the same arguments and give the same rows."""
    from bitsmith.codegen.gemv import GemvSpec

    spec = GemmSpec(1536, 576, 4, 32, False, 32)
    x, qweight, scales, zeros, _ = _quant_case(spec, seed=5)
    y = run_matmul(spec, x, qweight, scales, zeros, module)
    one = GemvSpec(1536, 576, 4, 32, False, 1)
    for row in (0, 17, 31):
        _close(y[row:row + 1], run_matmul(one, x[row:row + 1], qweight, scales, zeros))


def test_kernel_names_and_exports():
    assert GemmSpec(1536, 576, 4, 32, True, 64).name == "qgemm_b4_g32_sym_n1536_k576_r64"
    assert GemmSpec(7, 37, 3, -1, False, 16).name == "qgemm_b3_gch_asym_n7_k37_r16"
    assert GemmSpec(49152, 576, 16, rows=32).name == "gemm_float16_n49152_k576_r32"
    assert families.GemmSpec is GemmSpec and "GemmSpec" in families.__all__
    assert GemmSpec(1536, 576, 4, 32).weight_shape() == (1536, 72)


def test_tile_rows_fill_the_registers_and_avoid_padding():
    target = host_target()
    if target.vector_bytes != 64:
        pytest.skip("host has no AVX-512")
    assert [tile_rows(n, target) for n in (1, 7, 24, 576, 1536, 192, 4096, 49152)] == [1, 7, 24, 24, 24, 24, 24, 24]
    assert tile_rows(100, target) == 20 and tile_rows(1000, target) == 20


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(bits=4, group_size=48), dict(bits=4, rows=129),
                                    dict(bits=4, rows=0)])
def test_unsupported_kernels_are_refused(kwargs):
    with pytest.raises(BitsmithError, match="cannot build a GEMM"):
        GemmSpec(64, 576, **kwargs)


def test_host_kernel_is_a_broadcast_fma_register_block():
    """The K loop is NR zmm FMAs with a broadcast weight operand (no horizontal sums, no spills)."""
    if host_target().vector_bytes != 64:
        pytest.skip("host has no AVX-512")
    asm = build_module([GemmSpec(576, 576, 4, 32, True, 16)]).mod.inspect_source("asm")
    lines = asm.splitlines()
    fmas = [i for i, line in enumerate(lines) if "vfmadd231ps" in line and "{1to16}" in line and "zmm" in line]
    assert len(fmas) >= 24
    loop = lines[fmas[0]:fmas[0] + 24]  # the first register block: 24 consecutive broadcast FMAs
    assert all("{1to16}" in line for line in loop) and not any("rsp" in line for line in loop)


def test_aarch64_cross_build_compiles():
    """Cross targets get narrower row vectors (NEON: 4 lanes) from the same spec."""
    spec = GemmSpec(64, 200, 4, 32, False, 16)
    ll = build_module([spec], "aarch64-linux").mod.inspect_source("ll")
    assert spec.name in ll and "fmuladd.v4f32" in ll  # the register block's FMAs on 4-lane rows


def test_kernel_built_alone():
    spec = GemmSpec(33, 200, 2, 64, True, 16)
    x, qweight, scales, zeros, ref = _quant_case(spec, seed=2)
    _close(run_matmul(spec, x, qweight, scales), ref)
