"""The imported weight forms (GGUF Q4_0 ... Q2_K, act-order) in every matmul kernel, against the data model's
numpy dequantization: CPU GEMV and GEMM, the GPU definition built for this CPU, and a CUDA build with nvcc."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from bitsmith.codegen.embedding import QEmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.moe import MoeSpec
from bitsmith.codegen.scalar_slice import GatherSpec
from bitsmith.compiler.ops.quant import dequantize_packed
from bitsmith.compiler.ops.registry import OPS, RefContext
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import pack
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize
from conftest import assert_close_to_scale

# GGUF type -> (bits, group, form, super group): the data model's exact mappings
GGUF_FORMS = {"Q4_0": (4, 32, "sym", 0), "Q5_0": (5, 32, "sym", 0), "Q8_0": (8, 32, "sym", 0),
              "Q4_1": (4, 32, "min", 0), "Q5_1": (5, 32, "min", 0), "Q4_K": (4, 32, "min", 256),
              "Q5_K": (5, 32, "min", 256), "Q6_K": (6, 16, "sym", 256), "Q3_K": (3, 16, "sym", 256),
              "Q2_K": (2, 16, "min", 256)}
# int8 scale (and offset) code ranges of the K-quants: 6-bit unsigned (Q4_K, Q5_K), int8 (Q6_K), 6-bit signed
# (Q3_K: sc - 32), 4-bit unsigned (Q2_K)
CODE_RANGES = {"Q4_K": (0, 64), "Q5_K": (0, 64), "Q6_K": (-128, 128), "Q3_K": (-32, 32), "Q2_K": (0, 16)}
IN_FEATURES = (576, 256 * 4 + 40)  # SmolLM2's width (one super group partial); 4 super groups + a tail
RTOL = 1e-4  # of max|y|, as the other GEMV/GEMM tests: fp32 accumulation in another order than numpy's


def form(name: str) -> dict:
    bits, group, kind, sup = GGUF_FORMS[name]
    return dict(bits=bits, group_size=group, sym=kind == "sym", offset=kind == "min", super_group=sup)


def gemv(name: str, n_in: int, batch: int = 1, n_out: int = 64) -> GemvSpec:
    return GemvSpec(n_out, n_in, batch=batch, **form(name))


def gemm(name: str, n_in: int, rows: int = 17, n_out: int = 40) -> GemmSpec:
    return GemmSpec(n_out, n_in, rows=rows, **form(name))


def _gguf(spec) -> str:
    return next(n for n, f in GGUF_FORMS.items() if form(n) == {k: getattr(spec, k) for k in form(n)})


def quantized_weight(spec, rng: np.random.Generator, perm: bool = False) -> QuantizedWeight:
    """Random codes and parameters of the spec's form, in the ranges its GGUF type stores."""
    scheme = QuantScheme(spec.bits, spec.group_size, spec.sym, "imported", spec.offset, spec.super_group)
    shape, n_in = (spec.out_features, spec.n_groups), spec.in_features
    q = rng.integers(0, 1 << spec.bits, (spec.out_features, n_in), dtype=np.uint8)
    supers = (spec.out_features, -(-n_in // 256))
    if spec.super_group:
        lo, hi = CODE_RANGES[_gguf(spec)]
        scales = rng.integers(lo, hi, shape).astype(np.int8)
        zeros = rng.integers(0, hi, shape).astype(np.int8) if spec.offset else None
        d = (rng.random(supers) * 0.002 + 0.0002).astype(np.float16)
        dmin = (-(rng.random(supers) * 0.002 + 0.0002)).astype(np.float16) if spec.offset else None  # -dmin
        return QuantizedWeight(q, scales, zeros, scheme, n_in, super_scales=d, super_zeros=dmin)
    scales = (rng.random(shape) * 0.05 + 0.005).astype(np.float16)
    zeros = None if spec.sym else (-(rng.random(shape) * 0.4)).astype(np.float16)  # m: a group's min
    order = rng.permutation(n_in).astype(np.int32) if perm else None
    return QuantizedWeight(q, scales, zeros, scheme, n_in, perm=order)


def kernel_inputs(qw: QuantizedWeight) -> list[np.ndarray]:
    """qweight and the group parameters in the kernels' argument order (PackedWeightLayout.param_specs)."""
    parts = [pack(qw.q, qw.scheme.bits), qw.scales, qw.zeros, qw.super_scales, qw.super_zeros]
    return [p for p in parts if p is not None]


def case(spec, seed: int = 0) -> tuple[list[np.ndarray], np.ndarray]:
    """Kernel inputs and y = x @ dequantize(qw).T from the data model (runtime/quant_scheme.py)."""
    rng = np.random.default_rng(seed)
    qw = quantized_weight(spec, rng)
    rows = spec.batch if isinstance(spec, GemvSpec) else spec.rows
    x = rng.standard_normal((rows, spec.in_features)).astype(np.float32)
    return [x, *kernel_inputs(qw)], x @ dequantize(qw).T


FAST_SPECS = [gemv(n, 576) for n in GGUF_FORMS] + [gemv(n, 1064, 4) for n in ("Q4_K", "Q2_K")]
FAST_SPECS += [gemm(n, 1064) for n in ("Q4_K", "Q6_K", "Q5_1")]
# every form once more on the shapes the fast set leaves out (the 4x256 + 40 tail at batch 1, a 64-row GEMM on
# 576-wide rows): one kernel each, not every (shape, batch) pair, which cost CI minutes of cold kernel builds
SLOW_SPECS = [s for s in [gemv(n, 1064, 1) for n in GGUF_FORMS] + [gemm(n, 576, 64) for n in GGUF_FORMS]
              if s not in FAST_SPECS]


@pytest.fixture(scope="module")
def fast_module(host_kernels):
    return host_kernels(FAST_SPECS)


@pytest.fixture(scope="module")
def slow_module(host_kernels):
    return host_kernels(SLOW_SPECS)


def _check(spec, module) -> None:
    inputs, ref = case(spec)
    y = call_kernel(spec, inputs, [np.empty(ref.shape, np.float32)], module)[0]
    assert_close_to_scale(y, ref, RTOL)


@pytest.mark.parametrize("name", list(GGUF_FORMS))
def test_packed_reference_is_the_data_models_dequantize(name):
    """The kernels' oracle (qlinear's numpy reference) equals QuantizedWeight's dequantize bit for bit."""
    spec = gemv(name, 1064)
    qw = quantized_weight(spec, np.random.default_rng(1))
    attrs = {"bits": spec.bits, "group_size": spec.group_size, "in_features": spec.in_features, "sym": spec.sym,
             "offset": spec.offset, "super_group": spec.super_group}
    inputs = kernel_inputs(qw)
    names = [n for n, _, _ in spec.param_specs()]
    assert [a.dtype for a in inputs[1:]] == [np.dtype(d) for _, _, d in spec.param_specs()]
    params = dict(zip(names, inputs[1:]))
    w = dequantize_packed(inputs[0], params["scales"], params.get("zeros"), attrs, params.get("super_scales"),
                          params.get("super_zeros"))
    np.testing.assert_array_equal(w, dequantize(qw))


@pytest.mark.parametrize("spec", FAST_SPECS, ids=lambda s: s.name)
def test_gguf_forms_match_the_oracle(fast_module, spec):
    _check(spec, fast_module)


@pytest.mark.slow
@pytest.mark.parametrize("spec", SLOW_SPECS, ids=lambda s: s.name)
def test_gguf_forms_every_shape(slow_module, spec):
    _check(spec, slow_module)


@pytest.mark.parametrize("spec", [gemv("Q4_K", 1064, 3, 20), gemv("Q6_K", 576, 1, 20), gemv("Q2_K", 1064, 2, 20),
                                  gemm("Q5_1", 576, 17, 20)], ids=lambda s: s.name)
def test_gpu_definition_matches_the_oracle(spec):
    """The CUDA kernel's unscheduled definition built for this CPU (as tests/codegen/test_gpu_kernels.py)."""
    import tvm

    from bitsmith.codegen.target import host_target

    module = tvm.compile(tvm.IRModule({spec.name: spec.gpu_definition()}), target=host_target().tvm_target())
    inputs, ref = case(spec, seed=2)
    tensors = [tvm.runtime.tensor(a) for a in inputs] + [tvm.runtime.tensor(np.zeros(ref.shape, np.float32))]
    module[spec.name](*tensors)
    assert_close_to_scale(tensors[-1].numpy(), ref, RTOL)


def test_act_order_gather_and_reference():
    """perm: qlinear's reference gathers x[perm] for the stored (permuted) columns and equals x @ dequantize(qw).T
    in the original order; the gather kernel is that gather."""
    spec = gemv("Q4_1", 576, 3)
    rng = np.random.default_rng(4)
    qw = quantized_weight(spec, rng, perm=True)
    x = rng.standard_normal((3, 576)).astype(np.float32)
    attrs = {"bits": 4, "group_size": 32, "in_features": 576, "sym": False, "offset": True, "has_perm": True}
    parts = kernel_inputs(qw)
    y_ref = OPS["qlinear"].ref([x, *parts, qw.perm], attrs, RefContext({}, {}))[0]
    assert_close_to_scale(y_ref.astype(np.float32), x @ dequantize(qw).T, 1e-5)
    gathered = call_kernel(GatherSpec(3, 576), [x, qw.perm], [np.empty_like(x)])[0]
    np.testing.assert_array_equal(gathered, x[:, qw.perm])
    y = call_kernel(spec, [gathered, *parts], [np.empty((3, 64), np.float32)])[0]
    assert_close_to_scale(y, x @ dequantize(qw).T, RTOL)


def test_names_and_bytes():
    assert gemv("Q4_K", 4096).name == "qgemv_b4_g32_min_s256_n64_k4096_bs1"
    assert gemm("Q6_K", 576, 64).name == "qgemm_b6_g16_sym_s256_n40_k576_r64"
    assert GemvSpec(64, 576, 4, 32, True).name == "qgemv_b4_g32_sym_n64_k576_bs1"  # old forms keep their names
    # Q4_K: 4-bit codes + int8 scale and offset codes per 32 + fp16 d and dmin per 256
    assert gemv("Q4_K", 4096).weight_bytes() == 64 * (4096 // 2 + 2 * 128 + 2 * 2 * 16)
    assert gemv("Q6_K", 4096).weight_bytes() == 64 * (4096 * 6 // 8 + 256 + 2 * 16)


@pytest.mark.parametrize("make, match", [
    (lambda: GemvSpec(64, 576, 4, 32, True, offset=True), "min form"),
    (lambda: GemvSpec(64, 576, 4, -1, True, super_group=256), "super group 256 with group size -1"),
    (lambda: GemvSpec(64, 576, 4, 32, False, super_group=256), "zero points"),
    (lambda: GemmSpec(64, 576, 4, 32, True, super_group=128), "super group 128"),
    (lambda: QGemvI8Spec(64, 576, 4, 16, True), "groups of 16.*GemvSpec"),
    (lambda: QGemvI8Spec(64, 576, 5, 32, True), "bits 5"),
    (lambda: QEmbeddingSpec(2, 40, 576, 6, 32), "bits 6.*dequantized"),
    (lambda: QEmbeddingSpec(2, 40, 576, 4, 16), "group size 16.*dequantized"),
    (lambda: MoeSpec(2, 4, 2, 64, 32, 4, 16), "groups of 16.*requantize"),
])
def test_other_kernels_refuse_the_imported_forms(make, match):
    with pytest.raises(BitsmithError, match=match):
        make()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit not installed)")
def test_cuda_build(tmp_path, monkeypatch):
    """The GPU schedules of a few forms lower and build with nvcc (no GPU needed), with the gather kernel."""
    from bitsmith.codegen.build import build_kernel_library

    monkeypatch.setenv("BITSMITH_KERNEL_CACHE", str(tmp_path / "cache"))
    specs = [gemv("Q4_K", 4096), gemv("Q6_K", 1064, 4), gemm("Q5_1", 576, 64), gemv("Q3_K", 576), GatherSpec(4, 576)]
    report = build_kernel_library(specs, "cuda_sm_90a", tmp_path / "k.so")
    assert report.built == len(specs)
    assert all(spec.name.encode() in (tmp_path / "k.so").read_bytes() for spec in specs)


@pytest.mark.parametrize("name", ["Q6_K", "Q4_K"])
def test_gemv_products_are_vectorized_along_the_lanes(name):
    """Groups of 16 make a chunk one slot row: `inner` is then a plain product, still vectorized along the 16
    lanes (a unit reduction loop once vanished and the row tile got vectorized instead: 7x slower)."""
    from bitsmith.codegen.gemv import _lower
    from bitsmith.codegen.target import host_target

    script = _lower(gemv(name, 1024), host_target()).script()
    block = script.index('T.sblock("inner' + ('"' if name == "Q6_K" else '_update"'))
    loop = script.rindex("for ", 0, block)
    assert "T.vectorized(16)" in script[loop:block], script[loop - 200:block]
