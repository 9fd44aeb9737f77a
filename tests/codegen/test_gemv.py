"""Fused dequant-GEMV kernels against the numpy oracle (dequantize_packed + matmul), and cross builds."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.kernel import build_module, call_kernel
from bitsmith.codegen.target import cross_target, host_target, resolve_target
from bitsmith.errors import BitsmithError
from conftest import assert_close_to_scale, packed_matmul_case

BITS = (2, 3, 4, 8)
GROUPS = (32, 64, 128, -1)
SHAPES = ((7, 37), (33, 200), (64, 576), (1536, 576), (576, 1536))  # (out, in): tails, odd sizes
QUANT_SPECS = [GemvSpec(n, k, b, g, sym, bs) for b in BITS for g in GROUPS for sym in (True, False)
               for n, k in SHAPES for bs in (1, 4)]
QUANT_SPECS += [GemvSpec(64, 576, 4, 32, True, 16), GemvSpec(33, 200, 3, 64, False, 16)]
DENSE_SPECS = [GemvSpec(n, k, bits, batch=bs) for bits in (32, 16) for n, k in SHAPES for bs in (1, 4)]
DENSE_SPECS += [GemvSpec(64, 576, 32, batch=16)]
RTOL = 1e-4  # of max|y|: fp32 accumulation in another order than numpy's


@pytest.fixture(scope="module")
def module(host_kernels):
    """Every kernel of this file in one library, built through the kernel cache."""
    return host_kernels(QUANT_SPECS + DENSE_SPECS)


def run_matmul(spec, x: np.ndarray, weight: np.ndarray, scales: np.ndarray | None = None,
               zeros: np.ndarray | None = None, module=None) -> np.ndarray:
    """y = x @ dequant(W).T through the host kernel of a GemvSpec or GemmSpec (from `module` when given)."""
    rows = spec.batch if isinstance(spec, GemvSpec) else spec.rows
    params = [p for p in (scales, zeros) if p is not None]
    y = np.empty((rows, spec.out_features), np.float32)
    return call_kernel(spec, [x.reshape(rows, spec.in_features), weight, *params], [y], module)[0]


def _quant_case(spec: GemvSpec, seed: int = 0):
    return packed_matmul_case(spec, spec.batch, seed)


def _close(y: np.ndarray, ref: np.ndarray) -> None:
    assert_close_to_scale(y, ref, RTOL)


@pytest.mark.parametrize("spec", QUANT_SPECS, ids=lambda s: s.name)
def test_quantized_gemv_matches_oracle(module, spec):
    x, qweight, scales, zeros, ref = _quant_case(spec)
    _close(run_matmul(spec, x, qweight, scales, zeros, module), ref)


@pytest.mark.parametrize("spec", DENSE_SPECS, ids=lambda s: s.name)
def test_dense_gemv_matches_numpy(module, spec):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(spec.weight_shape()).astype(np.float32 if spec.bits == 32 else np.float16)
    x = rng.standard_normal((spec.batch, spec.in_features)).astype(np.float32)
    _close(run_matmul(spec, x, w, module=module), x @ w.astype(np.float32).T)


def test_kernel_names_describe_the_kernel():
    assert GemvSpec(1536, 576, 4, 32, True, 1).name == "qgemv_b4_g32_sym_n1536_k576_bs1"
    assert GemvSpec(7, 37, 3, -1, False, 4).name == "qgemv_b3_gch_asym_n7_k37_bs4"
    assert GemvSpec(64, 576, 16, batch=16).name == "gemv_float16_n64_k576_bs16"


@pytest.mark.parametrize("kwargs", [dict(bits=7), dict(bits=4, group_size=48), dict(bits=4, batch=17),
                                    dict(bits=4, batch=0)])
def test_unsupported_kernels_are_refused(kwargs):
    with pytest.raises(BitsmithError, match="cannot build a GEMV"):
        GemvSpec(64, 576, **kwargs)


def test_host_target_uses_the_exact_cpu():
    target = host_target()
    assert target.mcpu not in ("native", "generic", "")
    assert target.tvm["mcpu"] == target.mcpu and target.num_cores >= 1
    assert target.vector_bytes in (16, 32, 64)
    assert resolve_target("host") == target and resolve_target(target) is target


def test_unknown_target_names_the_supported_ones():
    with pytest.raises(BitsmithError, match="riscv.*host, aarch64-linux"):
        resolve_target("riscv64")


def test_host_kernel_uses_the_widest_vectors():
    target = host_target()
    if target.vector_bytes != 64:
        pytest.skip("host has no AVX-512")
    asm = build_module([GemvSpec(64, 576, 4, 32, True, 1)], target).mod.inspect_source("asm")
    assert "zmm" in asm


def test_aarch64_cross_build_exports_the_kernel(tmp_path: Path):
    gcc = shutil.which("aarch64-linux-gnu-gcc")
    if gcc is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)")
    target = cross_target("aarch64-linux")
    assert target.vector_bytes == 16 and target.tvm["mtriple"] == "aarch64-linux-gnu"
    spec = GemvSpec(64, 576, 4, 32, True, 1)
    lib = tmp_path / "kernels.so"
    build_module([spec], target).export_library(str(lib), cc="aarch64-linux-gnu-gcc")
    data = lib.read_bytes()
    assert data[:4] == b"\x7fELF" and int.from_bytes(data[18:20], "little") == 183  # e_machine EM_AARCH64
    nm = shutil.which("aarch64-linux-gnu-nm")
    if nm is not None:
        symbols = subprocess.run([nm, "-D", "--defined-only", str(lib)], capture_output=True, text=True,
                                 check=True).stdout
        assert spec.name in symbols
    else:
        assert spec.name.encode() in data
