"""The online Hadamard kernels against runtime/hadamard.py's numpy transform: odd sizes with a dense factor, powers of
two, mixed p * m, several row counts, the SwiGLU and RoPE prologues; the GPU definitions built for this CPU, the
CUDA schedule's limits and (with nvcc) an ahead-of-time CUDA build.

Tolerance: rtol 1e-5 of max|y| (float32 butterflies and an m-term dense sum, in the reference's order but
contracted to FMAs), 1e-4 with a silu/gelu prologue (exp, tanh and erf differ from numpy's by a few ulp, as
TRANSCENDENTAL in test_elementwise).
"""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.gpu.cuda_build import fatbin_archs
from bitsmith.codegen.gpu.hadamard import SHARED_BYTES, shared_bytes
from bitsmith.codegen.hadamard import UNROLLED_FACTOR, HadamardSpec, RopeHadamardSpec
from bitsmith.codegen.kernel import build_module, call_kernel
from bitsmith.codegen.target import cross_target, cuda_target, host_target
from bitsmith.compiler.ops import OPS
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.errors import BitsmithError
from bitsmith.runtime.hadamard import hadamard_transform
from conftest import assert_close_to_scale

RTOL = 1e-5
SILU_RTOL = 1e-4

# (n, m): odd sizes as one dense factor, powers of two, and p * m as in SmolLM2 (1536 = 128 * 12) and TinyStories
SIZES = [(3, 3), (5, 5), (7, 7), (9, 9), (1, 1), (2, 1), (64, 1), (128, 1), (1024, 1), (4096, 1),
         (96, 3), (384, 12), (1536, 12)]
SPECS = [HadamardSpec(rows, n, m) for n, m in SIZES for rows in (1, 5)]
SPECS += [HadamardSpec(64, 1536, 12), HadamardSpec(17, 4096), HadamardSpec(3, 96, 3, "float16"),
          HadamardSpec(2, 384, 12, "bfloat16"), HadamardSpec(3, 260, 65)]  # 65 > UNROLLED_FACTOR: a reduction
GATED = [HadamardSpec(1, 1536, 12, gate="silu"), HadamardSpec(64, 1536, 12, gate="silu"),
         HadamardSpec(3, 384, 12, gate="silu"), HadamardSpec(2, 64, gate="silu"), HadamardSpec(3, 384, 12, gate="gelu"),
         HadamardSpec(2, 96, 3, gate="gelu_tanh")]
ROPED = [RopeHadamardSpec(1, 9, 64, 64), RopeHadamardSpec(64, 3, 64, 64), RopeHadamardSpec(3, 2, 64, 32, "interleaved"),
         RopeHadamardSpec(2, 4, 80, 80, "half", 5), RopeHadamardSpec(5, 1, 16, 8, "half")]


@pytest.fixture(scope="module")
def library():
    """Every CPU kernel of this file in one module (one LLVM run)."""
    return build_module(SPECS + GATED + ROPED, "host")


def _factor(spec, rng) -> np.ndarray | None:
    """A dense (not orthogonal: the kernel must not rely on it) factor in the spec's stored dtype."""
    if spec.factor == 1:
        return None
    f = rng.standard_normal((spec.factor, spec.factor)) / np.sqrt(spec.factor)
    if spec.factor_dtype == "bfloat16":
        import ml_dtypes

        return f.astype(ml_dtypes.bfloat16)
    return f.astype(spec.factor_dtype)


def _out(*shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_hadamard_matches_numpy(spec, library):
    rng = np.random.default_rng(spec.n * 7 + spec.rows)
    x = rng.standard_normal((spec.rows, spec.n)).astype(np.float32)
    factor = _factor(spec, rng)
    y = call_kernel(spec, [x] + ([] if factor is None else [factor]), [_out(spec.rows, spec.n)], library)[0]
    expected = hadamard_transform(x, None if factor is None else factor.astype(np.float32))
    assert_close_to_scale(y, expected, RTOL)


@pytest.mark.parametrize("spec", GATED, ids=lambda s: s.name)
def test_gated_hadamard_matches_numpy(spec, library):
    rng = np.random.default_rng(spec.n + spec.rows)
    gate, up = (rng.standard_normal((2, spec.rows, spec.n)) * 3).astype(np.float32)
    factor = _factor(spec, rng)
    y = call_kernel(spec, [gate, up] + ([] if factor is None else [factor]), [_out(spec.rows, spec.n)], library)[0]
    assert_close_to_scale(y, hadamard_transform(_glu(spec.gate, gate, up), factor), SILU_RTOL)


def _glu(kind: str, gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """act(gate) * up by the IR ops' numpy references (kind: HadamardSpec.gate)."""
    op, attrs = ("gelu", {"approximate": "tanh" if kind == "gelu_tanh" else "none"}) if "gelu" in kind else ("silu", {})
    with np.errstate(over="ignore"):  # silu's exp(-x) overflows to inf for x < -88, as intended
        return OPS["mul"].ref([OPS[op].ref([gate], attrs, None)[0], up], {}, None)[0]


def _rope_case(spec, seed: int = 0):
    rng = np.random.default_rng(seed + spec.rows)
    x = rng.standard_normal((spec.rows, spec.heads, spec.head_dim)).astype(np.float32)
    positions = rng.integers(0, 4096, spec.rows).astype(np.int64)
    positions[0] = -1  # a padding row: just another angle
    inv = rope_inv_freq(spec.rotary_dim, 10000.0, None)
    factor = _factor(spec, rng)
    roped = OPS["rope"].ref([x, positions], {"theta": 10000.0, "rotary_dim": spec.rotary_dim, "style": spec.style},
                            None)[0]
    return [x, positions, inv] + ([] if factor is None else [factor]), hadamard_transform(roped, factor)


@pytest.mark.parametrize("spec", ROPED, ids=lambda s: s.name)
def test_rope_hadamard_matches_numpy(spec, library):
    inputs, expected = _rope_case(spec)
    y = call_kernel(spec, inputs, [_out(spec.rows, spec.heads, spec.head_dim)], library)[0]
    assert_close_to_scale(y, expected, RTOL)


@pytest.mark.parametrize("spec", [HadamardSpec(1, 1536, 12), HadamardSpec(3, 4096), RopeHadamardSpec(1, 9, 64, 64),
                                  HadamardSpec(2, 260, 65)],
                         ids=lambda s: s.name)
def test_work_is_n_log_p_plus_n_m(spec):
    """No dense n x n product: one [.., n] block per butterfly, and the dense factor's reduction is m long."""
    from tvm.s_tir import Schedule

    func = spec.prim_func(host_target())
    sch = Schedule(func)
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    n = spec.n if isinstance(spec, HadamardSpec) else spec.head_dim
    p = n // spec.factor
    assert sum(name.startswith("bfly") for name in names) == int(np.log2(p)) - 1 and "y" in names
    reductions = [v for b in sch.get_child_blocks(sch.get_sblock("root")) for v in sch.get(b).iter_vars
                  if v.iter_type == 2]
    assert all(int(v.dom.extent) == spec.factor for v in reductions)
    if 1 < spec.factor <= UNROLLED_FACTOR:  # written out: m products per output of the dense block
        dense = next(b for b in sch.get_child_blocks(sch.get_sblock("root")) if sch.get(b).name_hint == "dense")
        assert str(sch.get(dense).body).count("factor[") == spec.factor


def test_bad_descriptions_are_refused():
    with pytest.raises(BitsmithError, match="size 24 with factor 1"):
        HadamardSpec(1, 24)
    with pytest.raises(BitsmithError, match="size 40 with factor 3"):
        HadamardSpec(1, 40, 3)
    with pytest.raises(BitsmithError, match="gate 'relu'"):
        HadamardSpec(1, 64, gate="relu")
    with pytest.raises(BitsmithError, match="factor dtype 'int8'"):
        HadamardSpec(1, 96, 3, "int8")
    with pytest.raises(BitsmithError, match="rotary_dim 65"):
        RopeHadamardSpec(1, 2, 64, 65)


def test_kernels_compile_for_aarch64():
    """The CPU schedule cross-compiles (NEON vectors of 4 floats; linking is tests/codegen/test_cross_link.py's)."""
    module = build_module([HadamardSpec(1, 1536, 12, gate="silu"), RopeHadamardSpec(4, 3, 64, 64), HadamardSpec(2, 9, 9)],
                          cross_target("aarch64-linux"))
    assert module is not None


# --------------------------------------------------------------------------------- GPU

GPU_SPECS = [HadamardSpec(1, 1536, 12, gate="silu"), HadamardSpec(2, 384, 12, gate="gelu_tanh"), HadamardSpec(4, 4096), HadamardSpec(3, 9, 9), HadamardSpec(2, 1),
             HadamardSpec(16, 384, 12), RopeHadamardSpec(16, 9, 64, 64), RopeHadamardSpec(2, 3, 64, 32, "interleaved"),
             RopeHadamardSpec(2, 2, 80, 80, "half", 5)]


def _gpu_definition_on_cpu(spec, inputs, shape):
    import tvm

    module = tvm.compile(tvm.IRModule({spec.name: spec.gpu_definition()}), target=host_target().tvm_target())
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (*inputs, _out(*shape))]
    module[spec.name](*tensors)
    return tensors[-1].numpy()


@pytest.mark.parametrize("spec", GPU_SPECS, ids=lambda s: s.name)
def test_gpu_definition_matches_numpy(spec):
    """The GPU kernel's semantics (libm exp, cos and sin) built for this CPU."""
    rng = np.random.default_rng(1)
    if isinstance(spec, RopeHadamardSpec):
        inputs, expected = _rope_case(spec, seed=1)
        shape, rtol = (spec.rows, spec.heads, spec.head_dim), RTOL
    else:
        factor = _factor(spec, rng)
        x = rng.standard_normal((2 if spec.gate else 1, spec.rows, spec.n)).astype(np.float32)
        x0 = _glu(spec.gate, x[0], x[1]) if spec.gate else x[0]
        inputs = list(x) + ([] if factor is None else [factor])
        expected, shape, rtol = hadamard_transform(x0, factor), (spec.rows, spec.n), SILU_RTOL if spec.gate else RTOL
    assert_close_to_scale(_gpu_definition_on_cpu(spec, inputs, shape), expected, rtol)


@pytest.mark.parametrize("spec", GPU_SPECS, ids=lambda s: s.name)
def test_gpu_schedule_fits_the_gpu(spec):
    """Lowered for sm_90a: thread and shared memory limits (no nvcc needed)."""
    import tvm
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    target = cuda_target().tvm_target()
    module = tvm.IRModule({spec.name: spec.prim_func(cuda_target())})
    with target:
        lowered = default_s_tir_pipeline()[0](tvm.tirx.transform.BindTarget(target)(module))
    assert tvm.s_tir.analysis.verify_gpu_code(lowered[spec.name], {"max_threads_per_block": 1024,
                                                                   "max_shared_memory_per_block": SHARED_BYTES})


def test_gpu_refuses_rows_beyond_shared_memory():
    with pytest.raises(BitsmithError, match="shared memory"):
        HadamardSpec(1, 8192).prim_func(cuda_target())


needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit not installed)")


@needs_nvcc
def test_cuda_build_and_its_shared_memory(tmp_path, monkeypatch):
    """nvcc builds every GPU kernel into one sm_90a fatbin; the CUDA source allocates at most shared_bytes(n) of
    shared memory per block (TVM reuses a stage's buffer two stages on: the lowering's limit relies on it)."""
    import tvm

    from bitsmith.codegen.gpu.cuda_build import _nvcc_mode, ensure_cuda_runtime

    monkeypatch.setenv("BITSMITH_KERNEL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "cuda.so"
    report = build_kernel_library(GPU_SPECS, "cuda", path)
    assert report.kernels == len(GPU_SPECS) and fatbin_archs(path) == {"sm_90a"}
    ensure_cuda_runtime()
    target = cuda_target()
    for spec in (HadamardSpec(1, 4096), HadamardSpec(1, 1536, 12, gate="silu")):
        with _nvcc_mode(), target.tvm_target() as tvm_target:
            module = tvm.compile(tvm.IRModule({spec.name: spec.prim_func(target)}), target=tvm_target)
        source = next(m.inspect_source("cuda") for m in module.mod.imports if m.kind == "cuda")
        shared = sum(4 * int(size) for size in re.findall(r"__shared__[^;]*float \w+\[(\d+)\]", source))
        assert 0 < shared <= shared_bytes(spec.n), (spec.name, shared)
