"""bfloat16 weights in every family that reads a dense weight (embedding, norms, bias add, dense GEMV/GEMM): the
host kernels and the GPU definitions (built for this CPU) against the numpy references on the same values in
float32, an exact widening (special values bit for bit), and an ahead-of-time CUDA build when nvcc is installed.

A bf16 weight reaches a kernel as its uint16 bits and is widened by a 16-bit shift (runtime/kernel_dtypes.py):
the kernel must compute exactly what its float32 twin computes on float32(w), so the tolerances are the float32
kernels' own (EXACT for norms, 1e-4 of max|y| for matmuls, equality for lookups).
"""

from __future__ import annotations

import functools
import shutil

import ml_dtypes
import numpy as np
import pytest

from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.elementwise import BiasAddSpec
from bitsmith.codegen.embedding import EmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec
from bitsmith.codegen.target import cuda_target, host_target, weight_dtype
from bitsmith.errors import BitsmithError
from bitsmith.runtime.kernel_dtypes import kernel_array
from conftest import assert_close_to_scale
from test_elementwise import EXACT, out, ref, rng_for

BF16 = np.dtype(ml_dtypes.bfloat16)
MATMUL_RTOL = 1e-4  # of max|y|, as the float32/float16 GEMV and GEMM tests
SHAPES = ((7, 37), (33, 200), (64, 576), (576, 1536))  # (out, in): a scalar tail, a vector tail, whole blocks

GEMV_SPECS = [GemvSpec(n, k, 16, batch=bs, bf16=True) for (n, k), bs in zip(SHAPES, (1, 4, 1, 16))]
GEMV_SPECS += [GemvSpec(1536, 576, 16, batch=1, bf16=True)]
GEMM_SPECS = [GemmSpec(64, 576, 16, rows=16, bf16=True), GemmSpec(40, 37, 16, rows=17, bf16=True),
              GemmSpec(576, 1536, 16, rows=64, bf16=True)]
NORM_SPECS = [RmsNormSpec(r, d, "bfloat16", 1e-5) for r, d in ((1, 7), (3, 65), (64, 576))]
NORM_SPECS += [AddRmsNormSpec(r, d, "bfloat16", 1e-6) for r, d in ((1, 7), (16, 576))]
NORM_SPECS += [LayerNormSpec(r, d, "bfloat16", 1e-5, bias) for (r, d), bias in (((1, 7), True), ((16, 576), False))]
BIAS_SPECS = [BiasAddSpec(r, n, "bfloat16") for r, n in ((1, 7), (3, 65), (64, 576))]
EMB_SPECS = [EmbeddingSpec(r, v, d, "bfloat16") for r, v, d in ((1, 50, 7), (3, 50, 65), (64, 100, 576))]
ALL_SPECS = GEMV_SPECS + GEMM_SPECS + NORM_SPECS + BIAS_SPECS + EMB_SPECS


def bf16_normal(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """Random bf16 values (rounded to nearest even from float32, as torch and ml_dtypes do)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(BF16)


def case(spec) -> tuple[list[np.ndarray], np.ndarray, str]:
    """(inputs, expected outputs stacked, how to compare) for a bf16 spec: the numpy reference on float32(w)."""
    rng = rng_for(spec)
    if isinstance(spec, (GemvSpec, GemmSpec)):
        rows = spec.batch if isinstance(spec, GemvSpec) else spec.rows
        x = rng.standard_normal((rows, spec.in_features)).astype(np.float32)
        w = bf16_normal(rng, (spec.out_features, spec.in_features))
        return [x, w], x @ w.astype(np.float32).T, "matmul"
    if isinstance(spec, EmbeddingSpec):
        table = bf16_normal(rng, (spec.vocab, spec.dim))
        ids = rng.integers(0, spec.vocab, spec.rows).astype(np.int64)
        return [table, ids], ref("embedding", [table.astype(np.float32), ids]), "equal"
    if isinstance(spec, BiasAddSpec):
        x = rng.standard_normal((spec.rows, spec.n)).astype(np.float32)
        b = bf16_normal(rng, (spec.n,))
        return [x, b], x + b.astype(np.float32), "equal"
    x = (rng.standard_normal((spec.rows, spec.dim)) * 2 + 1.5).astype(np.float32)
    w = bf16_normal(rng, (spec.dim,))
    if isinstance(spec, RmsNormSpec):
        return [x, w], ref("rmsnorm", [x, w.astype(np.float32)], eps=spec.eps), "exact"
    if isinstance(spec, AddRmsNormSpec):
        res = rng.standard_normal(x.shape).astype(np.float32)
        total = x + res
        return [x, res, w], np.stack([total, ref("rmsnorm", [total, w.astype(np.float32)], eps=spec.eps)]), "exact"
    params = [w] + ([bf16_normal(rng, (spec.dim,))] if spec.has_bias else [])
    expected = ref("layernorm", [x] + [p.astype(np.float32) for p in params], eps=spec.eps)
    return [x, *params], expected, "exact"


def n_outputs(spec) -> int:
    return 2 if isinstance(spec, AddRmsNormSpec) else 1


def check(y: np.ndarray, expected: np.ndarray, how: str) -> None:
    if how == "matmul":
        assert_close_to_scale(y, expected, MATMUL_RTOL)
    elif how == "equal":
        np.testing.assert_array_equal(y, expected)
    else:
        np.testing.assert_allclose(y, expected, **EXACT)


@pytest.fixture(scope="module")
def module(host_kernels):
    """Every host kernel of this file in one library, built through the kernel cache."""
    return host_kernels(ALL_SPECS)


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda s: s.name)
def test_host_kernel_matches_the_reference(module, spec):
    inputs, expected, how = case(spec)
    outputs = [out(*expected.shape[-2:]) for _ in range(n_outputs(spec))]
    ys = call_kernel(spec, inputs, outputs, module)
    check(np.stack(ys) if len(ys) > 1 else ys[0], expected, how)


@functools.lru_cache(maxsize=None)
def _gpu_definition_on_host(spec):
    import tvm

    return tvm.compile(tvm.IRModule({spec.name: spec.gpu_definition()}), target=host_target().tvm_target())[spec.name]


@pytest.mark.parametrize("spec", [GEMV_SPECS[1], GEMV_SPECS[2], GEMM_SPECS[1], NORM_SPECS[1], NORM_SPECS[3],
                                  NORM_SPECS[4], BIAS_SPECS[1], EMB_SPECS[1]], ids=lambda s: s.name)
def test_gpu_definition_matches_the_reference(spec):
    """The GPU kernels' definitions (gpu/compute.py, gpu/matmul.py) read bf16 the same way: built for this CPU."""
    import tvm

    inputs, expected, how = case(spec)
    outputs = [out(*expected.shape[-2:]) for _ in range(n_outputs(spec))]
    tensors = [tvm.runtime.tensor(kernel_array(np.ascontiguousarray(a))) for a in (*inputs, *outputs)]
    _gpu_definition_on_host(spec)(*tensors)
    ys = [t.numpy() for t in tensors[len(inputs):]]
    check(np.stack(ys) if len(ys) > 1 else ys[0], expected, how)


def test_widening_is_exact_for_special_values(module):
    """Every bf16 bit pattern class (signed zeros, subnormals, extremes, infinities, NaN) widens to the same
    float32 bits as ml_dtypes' conversion: the lookup returns table rows bit for bit."""
    spec = EMB_SPECS[1]
    special = np.array([0.0, -0.0, 1.0, -2.5, 1e-40, -1e-39, 3.3e38, -3.3e38, np.inf, -np.inf, np.nan],
                       np.float32).astype(BF16)
    table = bf16_normal(np.random.default_rng(0), (spec.vocab, spec.dim))
    table[1, :len(special)] = special
    table[2] = np.arange(spec.dim, dtype=np.uint16).view(BF16)  # the smallest bit patterns, subnormals among them
    ids = np.array([1, 2, 0], np.int64)
    y = call_kernel(spec, [table, ids], [out(spec.rows, spec.dim)], module)[0]
    np.testing.assert_array_equal(y.view(np.uint32), table[ids].astype(np.float32).view(np.uint32))


def test_bf16_kernels_take_the_bits_and_are_named_apart():
    """The weight argument is uint16 (what the runners hand over), and a bf16 kernel never shares a name (the
    kernel cache key's symbol) with its fp16 twin."""
    gemv, emb = GemvSpec(33, 200, 16, bf16=True), EmbeddingSpec(3, 50, 65, "bfloat16")
    assert 'weight: T.Buffer((33, 200), "uint16")' in gemv.prim_func(host_target()).script()
    assert gemv.name != GemvSpec(33, 200, 16).name and "bfloat16" in gemv.name
    assert GemmSpec(40, 37, 16, rows=17, bf16=True).name != GemmSpec(40, 37, 16, rows=17).name
    assert emb.name != EmbeddingSpec(3, 50, 65, "float16").name
    assert weight_dtype(gemv) == weight_dtype(emb) == "bfloat16" and weight_dtype(GemvSpec(33, 200, 16)) == "float16"
    for target in (host_target(), cuda_target()):
        for spec in (gemv, emb, RmsNormSpec(1, 7, "bfloat16", 1e-5)):
            target.check(spec)  # every target reads bf16: nothing is converted for one


@pytest.mark.parametrize("make", [lambda: GemvSpec(8, 64, 4, 32, True, 1, bf16=True),
                                  lambda: GemmSpec(8, 64, 32, rows=16, bf16=True)])
def test_bf16_is_only_for_16_bit_dense_weights(make):
    with pytest.raises(BitsmithError, match="bf16 with bits"):
        make()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit not installed)")
def test_cuda_build_of_every_bf16_family(tmp_path, monkeypatch):
    """Built ahead of time with nvcc for sm_90a (no GPU needed): the CUDA code widens the same bits."""
    monkeypatch.setenv("BITSMITH_KERNEL_CACHE", str(tmp_path / "cache"))
    specs = [GEMV_SPECS[1], GEMV_SPECS[4], GEMM_SPECS[0], NORM_SPECS[0], NORM_SPECS[3], NORM_SPECS[5], BIAS_SPECS[0],
             EMB_SPECS[2]]
    path = tmp_path / "cuda_sm_90a.so"
    report = build_kernel_library(specs, "cuda_sm_90a", path)
    assert report.built == len(specs)
    assert all(spec.name.encode() in path.read_bytes() for spec in specs)
