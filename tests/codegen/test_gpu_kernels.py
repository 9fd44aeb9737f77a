"""GPU kernels without a GPU: every family's GPU definition (`spec.gpu_definition()`, for paged attention the GPU
algorithm with serial loops for threads) compiled for this CPU against the numpy references, with the CPU
tests' tolerances; an ahead-of-time CUDA build of one kernel of every family when nvcc is installed."""

from __future__ import annotations

import functools
import itertools
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gemv_int8 import QGemvI8Spec
from bitsmith.codegen.gemv_x16 import QGemvX16Spec
from bitsmith.codegen import families
from bitsmith.codegen.build import build_kernel_library
from bitsmith.codegen.gpu.cuda_build import _fatbins, fatbin_archs, parse_fatbin_archs
from bitsmith.codegen.kernel import build_module, call_kernel
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.paged_attention import PagedAttentionSpec
from bitsmith.codegen.target import CPU_FAMILIES, CUDA_ARCHS, GPU_FAMILIES, cuda_target, host_target, resolve_target
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.errors import BitsmithError
from conftest import assert_close_to_scale, packed_matmul_case
from test_elementwise import (DTYPES, EXACT, ROPE, TRANSCENDENTAL, _activation_input, _activation_ref, _qemb_case,
                              normal, out, ref, rng_for)
from test_paged_attention import SPECS as PAGED_SPECS
from test_paged_attention import TOL as PAGED_TOL
from test_paged_attention import _batch, _reference, _scenarios, check_ring

MATMUL_RTOL = 1e-4  # of max|y|, as the CPU GEMV/GEMM tests


@functools.lru_cache(maxsize=None)
def _host_function(spec):
    """`spec.gpu_definition()` built for this CPU (once per process)."""
    import tvm

    module = tvm.compile(tvm.IRModule({spec.name: spec.gpu_definition()}), target=host_target().tvm_target())
    return module, module[spec.name]


def run(spec, inputs: list[np.ndarray], outputs: list[np.ndarray]) -> list[np.ndarray]:
    """Run the CPU build of spec's GPU definition; outputs and in-place inputs are copied back."""
    import tvm

    _, func = _host_function(spec)
    tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in (*inputs, *outputs)]
    func(*tensors)
    for array, tensor in zip((*inputs, *outputs), tensors):
        if array.flags.writeable:
            array[...] = tensor.numpy()
    return list(outputs)


# --------------------------------------------------------------------------------- GEMV / GEMM

# every bits x group (32, 128 (does not divide 576), per channel) x sym; (out, in) and batch round-robin:
# 576 = 4 int4 blocks + a 64-value tail; 200 = tail only at 2/3 bits, odd tail lanes at 4/8 bits; 600 at
# 3 bits = one 512-value block + tail; 1024 whole blocks
GEMV_SPECS = [GemvSpec(n, k, b, g, sym, bs) for (b, g, sym), (n, k), bs in zip(
    itertools.product((2, 3, 4, 8), (32, 128, -1), (True, False)),
    itertools.cycle(((64, 576), (33, 200), (20, 600), (8, 1024))), itertools.cycle((1, 4)))]
GEMV_SPECS += [GemvSpec(16, 576, 4, 32, True, 16), GemvSpec(7, 37, 3, -1, False, 3)]
GEMV_SPECS += [GemvSpec(n, k, bits, batch=bs) for bits in (16, 32) for (n, k), bs in
               zip(((64, 576), (33, 37), (9, 1030)), itertools.cycle((1, 4)))]
GEMM_SPECS = [GemmSpec(64, 576, 4, 32, True, 16), GemmSpec(33, 200, 3, 64, False, 16),
              GemmSpec(24, 1024, 2, 128, False, 20), GemmSpec(64, 576, 16, rows=16), GemmSpec(40, 37, 32, rows=17)]


def _matmul_case(spec, seed: int = 0):
    rows = spec.batch if isinstance(spec, GemvSpec) else spec.rows
    if spec.is_quantized:
        x, qweight, scales, zeros, expected = packed_matmul_case(spec, rows, seed)
        return [x, qweight, scales] + ([] if zeros is None else [zeros]), expected
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(spec.weight_shape()).astype(np.float32 if spec.bits == 32 else np.float16)
    x = rng.standard_normal((rows, spec.in_features)).astype(np.float32)
    return [x, w], x @ w.astype(np.float32).T


@pytest.mark.parametrize("spec", GEMV_SPECS + GEMM_SPECS, ids=lambda s: s.name)
def test_matmul_definition_matches_oracle(spec):
    inputs, expected = _matmul_case(spec)
    y = run(spec, inputs, [out(*expected.shape)])[0]
    assert_close_to_scale(y, expected, MATMUL_RTOL)


@pytest.mark.parametrize("spec", [GemvSpec(33, 576, 4, 128, False, 4), GemmSpec(64, 576, 16, rows=16)],
                         ids=lambda s: s.name)
def test_matmul_definition_matches_the_cpu_kernel(spec):
    inputs, expected = _matmul_case(spec, seed=3)
    gpu = run(spec, inputs, [out(*expected.shape)])[0]
    cpu = call_kernel(spec, inputs, [out(*expected.shape)])[0]
    assert_close_to_scale(gpu, cpu, MATMUL_RTOL)


@pytest.mark.parametrize("spec", GEMV_SPECS + GEMM_SPECS, ids=lambda s: s.name)
def test_matmul_thread_split_divides_every_reduction(spec):
    """The schedule splits the first reduction axis of `main` and `tail` over TX threads. A split that does
    not divide keeps its predicate on the loads only: on an H100 the threads past the end added stale
    registers (fp16 576-wide GEMVs were off by 50%). The definition pads those axes and masks the extra
    iterations (the oracle tests above check the masking)."""
    from tvm.s_tir import Schedule

    from bitsmith.codegen.gpu.matmul import matmul_reference, matmul_shape

    shape = matmul_shape(spec)
    sch = Schedule(matmul_reference(spec))
    names = {sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))}
    split = [name for name in ("main", "tail") if name in names]
    assert split
    for name in split:
        first = next(v for v in sch.get(sch.get_sblock(name)).iter_vars if v.iter_type == 2)  # CommReduce
        assert int(first.dom.extent) % shape.threads == 0, (name, int(first.dom.extent), shape.threads)


# --------------------------------------------------------------------------------- norms, elementwise

NORM_SPECS = [RmsNormSpec(r, d, dt, 1e-5) for (r, d), dt in zip(((1, 7), (3, 65), (16, 576)), itertools.cycle(DTYPES))]
NORM_SPECS += [AddRmsNormSpec(r, d, dt, 1e-6) for (r, d), dt in zip(((1, 7), (3, 576)), DTYPES)]
NORM_SPECS += [LayerNormSpec(r, d, dt, 1e-5, bias) for (r, d), dt, bias in
               zip(((1, 7), (3, 65), (16, 576)), itertools.cycle(DTYPES), itertools.cycle((True, False)))]


@pytest.mark.parametrize("spec", NORM_SPECS, ids=lambda s: s.name)
def test_norm(spec):
    rng = rng_for(spec)
    x = normal(rng, (spec.rows, spec.dim), scale=2.0) + np.float32(1.5)
    w = normal(rng, (spec.dim,), spec.weight_dtype)
    if isinstance(spec, RmsNormSpec):
        y = run(spec, [x, w], [out(spec.rows, spec.dim)])[0]
        np.testing.assert_allclose(y, ref("rmsnorm", [x, w], eps=spec.eps), **EXACT)
    elif isinstance(spec, AddRmsNormSpec):
        res = normal(rng, (spec.rows, spec.dim), scale=4.0)
        total, y = run(spec, [x, res, w], [out(spec.rows, spec.dim), out(spec.rows, spec.dim)])
        np.testing.assert_array_equal(total, ref("add", [x, res]))
        np.testing.assert_allclose(y, ref("rmsnorm", [ref("add", [x, res]), w], eps=spec.eps), **EXACT)
    else:
        params = [w] + ([normal(rng, (spec.dim,), spec.weight_dtype)] if spec.has_bias else [])
        y = run(spec, [x, *params], [out(spec.rows, spec.dim)])[0]
        np.testing.assert_allclose(y, ref("layernorm", [x, *params], eps=spec.eps), **EXACT)


ELEMENTWISE_SPECS = [BinarySpec(n, op) for n, op in ((7, "add"), (40000, "mul"))]
ELEMENTWISE_SPECS += [BiasAddSpec(3, 65, dt) for dt in DTYPES]
ELEMENTWISE_SPECS += [UnarySpec(65, op) for op in ("silu", "gelu", "gelu_tanh", "relu")]
ELEMENTWISE_SPECS += [SiluMulSpec(576), GeluMulSpec(65, "none"), GeluMulSpec(65, "tanh")]


@pytest.mark.parametrize("spec", ELEMENTWISE_SPECS, ids=lambda s: s.name)
def test_elementwise(spec):
    rng = rng_for(spec)
    if isinstance(spec, BinarySpec):
        a, b = normal(rng, spec.n), normal(rng, spec.n)
        np.testing.assert_allclose(run(spec, [a, b], [out(spec.n)])[0], ref(spec.op, [a, b]), **EXACT)
    elif isinstance(spec, BiasAddSpec):
        x, b = normal(rng, (spec.rows, spec.n)), normal(rng, (spec.n,), spec.bias_dtype)
        np.testing.assert_allclose(run(spec, [x, b], [out(spec.rows, spec.n)])[0], ref("add", [x, b]), **EXACT)
    elif isinstance(spec, UnarySpec):
        x = _activation_input(rng, spec.n)
        tol = EXACT if spec.op == "relu" else TRANSCENDENTAL
        np.testing.assert_allclose(run(spec, [x], [out(spec.n)])[0], _activation_ref(spec.op, x), **tol)
    else:
        gate, up = _activation_input(rng, spec.n), normal(rng, spec.n)
        op = "silu" if isinstance(spec, SiluMulSpec) else ("gelu_tanh" if spec.approximate == "tanh" else "gelu")
        expected = ref("mul", [_activation_ref(op, gate), up])
        np.testing.assert_allclose(run(spec, [gate, up], [out(spec.n)])[0], expected, **TRANSCENDENTAL)


ROPE_SPECS = [RopeSpec(*shape, style) for shape in ((1, 2, 64, 64), (3, 4, 80, 32), (3, 1, 7, 4))
              for style in ("half", "interleaved")]


@pytest.mark.parametrize("spec", ROPE_SPECS, ids=lambda s: s.name)
def test_rope(spec):
    rng = rng_for(spec)
    positions = rng.integers(0, 8193, spec.rows).astype(np.int64)
    positions[0] = 8192
    x = normal(rng, (spec.rows, spec.heads, spec.head_dim))
    inv = rope_inv_freq(spec.rotary_dim, 10000.0, None)
    y = run(spec, [x, positions, inv], [out(spec.rows, spec.heads, spec.head_dim)])[0]
    expected = ref("rope", [x, positions], theta=10000.0, rotary_dim=spec.rotary_dim, style=spec.style)
    np.testing.assert_allclose(y, expected, **ROPE)
    np.testing.assert_array_equal(y[..., spec.rotary_dim:], x[..., spec.rotary_dim:])


EMBEDDING_SPECS = [EmbeddingSpec(3, 50, 65, dt) for dt in DTYPES]
EMBEDDING_SPECS += [QEmbeddingSpec(3, 40, d, b, g, sym) for (b, g, sym), d in
                    zip(itertools.product((2, 3, 4, 8), (32, -1), (True, False)), itertools.cycle((200, 600)))]
EMBEDDING_SPECS += [QEmbeddingSpec(2, 40, 1024, 4, 128, False), QEmbeddingSpec(2, 40, 7, 3, 32, False)]


@pytest.mark.parametrize("spec", EMBEDDING_SPECS, ids=lambda s: s.name)
def test_embedding(spec):
    rng = rng_for(spec)
    ids = np.array([spec.vocab - 1, -3, 1 << 40][:spec.rows], np.int64)  # the last row, clamped ids
    clamped = np.clip(ids, 0, spec.vocab - 1)
    if isinstance(spec, EmbeddingSpec):
        params = [normal(rng, (spec.vocab, spec.dim), spec.dtype)]
        table = params[0]
    else:
        params, table = _qemb_case(spec, rng)
    y = run(spec, [*params, ids], [out(spec.rows, spec.dim)])[0]
    np.testing.assert_allclose(y, ref("embedding", [table, clamped]), **EXACT)


# --------------------------------------------------------------------------------- paged attention


def _check_paged(spec, inputs):
    expected, expected_cache, expected_scales = _reference(spec, *inputs[:6], inputs[6] if len(inputs) > 6 else None)
    args = [a.copy() for a in inputs]
    result = run(spec, args, [np.full((spec.rows, spec.heads, spec.head_dim), np.nan, np.float32)])[0]
    np.testing.assert_allclose(result, expected, rtol=PAGED_TOL, atol=PAGED_TOL)
    assert np.all(result[inputs[3] < 0] == 0), "padding rows must produce zeros"
    bits = (lambda a: a.view(np.uint16)) if spec.kv_dtype == "float16" else (lambda a: a)
    np.testing.assert_array_equal(bits(args[5]), bits(expected_cache))
    if spec.kv_dtype in ("int8", "int4"):
        np.testing.assert_array_equal(args[6], expected_scales)


@pytest.mark.parametrize("spec", PAGED_SPECS, ids=lambda s: s.name)
def test_paged_attention_matches_oracle(spec):
    """Padding rows, several sequences per call, shared prefix blocks, sliding windows, fp32/fp16/int8/int4 pools."""
    for n, (label, seqs, padding, shared) in enumerate(_scenarios(spec)):
        inputs, _ = _batch(spec, np.random.default_rng(n), seqs, padding, shared)
        try:
            _check_paged(spec, inputs)
        except AssertionError as err:
            raise AssertionError(f"scenario {label}: {err}") from None


def test_paged_attention_ring_of_blocks():
    """A windowed layer's ring of blocks (soft-capped), against numpy over the whole history."""
    check_ring(lambda spec, inputs, result: run(spec, inputs, [result])[0])


def test_paged_attention_later_rows_win_and_bad_tables_give_zeros():
    """Two rows writing one slot: the later row's k/v stay (rows write in parallel on the GPU). A row whose
    visible block is outside the pool writes nothing and gets zeros; a long context spans several tiles."""
    spec = PagedAttentionSpec(3, 4, 2, 16, 16, 64, 24, 0.25, None, "int8")
    inputs, _ = _batch(spec, np.random.default_rng(7), [(300, 1), (40, 1), (5, 1)], 0)
    rows = np.argsort(inputs[3])  # by position: 5, 40, 300
    inputs[3][rows[1]] = inputs[3][rows[2]]  # same position and table: both write the same slot
    inputs[4][rows[1]] = inputs[4][rows[2]]
    inputs[4][rows[0], 0] = spec.num_blocks + 3  # its only block is outside the pool
    _check_paged(spec, inputs)


def test_paged_attention_int8_rounds_half_to_even():
    spec = PagedAttentionSpec(2, 4, 2, 16, 16, 4, 2, 0.25, None, "int8")
    inputs, _ = _batch(spec, np.random.default_rng(3), [(5, 1), (0, 1)], 0)
    ties = np.array([127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 3.5, -3.5, 100.5, -126.5, 7, 0, -8.5, 9.5],
                    np.float32)
    inputs[1][:, 0], inputs[2][:, 0], inputs[1][:, 1] = ties, ties / 2, 0
    _check_paged(spec, inputs)


# --------------------------------------------------------------------------------- targets and refusals


def test_cuda_targets_resolve_by_name():
    target = resolve_target("cuda")
    assert target == cuda_target("sm_90a") and target.name == "cuda_sm_90a"
    assert target.is_gpu and target.arch == "cuda" and not host_target().is_gpu
    assert target.tvm_target().kind.name == "cuda"
    assert all(resolve_target(f"cuda_{arch}").tvm["arch"] == arch for arch in CUDA_ARCHS)
    with pytest.raises(BitsmithError, match="cuda_sm_70.*cuda_sm_80"):
        resolve_target("cuda_sm_70")


def test_targets_declare_the_families_they_build():
    """CPUs build every family the lowering can emit; GPUs all but the int8-activation matmuls, and every
    family a GPU builds has a GPU definition."""
    assert set(CPU_FAMILIES) == set(families.__all__)
    # int8-activation GEMVs need AVX-512 VNNI; the MoE router and expert kernels have no CUDA schedule yet
    assert set(CPU_FAMILIES) - set(GPU_FAMILIES) == {"QGemvI8Spec", "QGemvX16Spec", "RouterSpec", "MoeSpec"}
    assert resolve_target("cuda").families == GPU_FAMILIES and host_target().families == CPU_FAMILIES
    assert all(hasattr(getattr(families, name), "gpu_definition") for name in GPU_FAMILIES)
    assert resolve_target("cuda").activations == ("float32",) and "float32" in host_target().activations
    for spec in BUILD_SPECS:
        resolve_target("cuda").check(spec)
        host_target().check(spec)


@pytest.mark.parametrize("spec", [QGemvI8Spec(64, 576, 4, 32, True, 1), QGemvX16Spec(64, 576, 4, 32, True, 1)],
                         ids=lambda s: type(s).__name__)
def test_families_without_gpu_kernels_are_refused(spec, fresh_kernel_cache):
    """By the target's check, the spec's prim_func and the build, naming the family, the target and the fix."""
    family = type(spec).__name__
    message = f"cannot build a {family} kernel for target cuda_sm_90a.*fix: use GemvSpec"
    with pytest.raises(BitsmithError, match=message):
        cuda_target().check(spec)
    with pytest.raises(BitsmithError, match=message):
        spec.prim_func(cuda_target())
    with pytest.raises(BitsmithError, match=message):
        build_kernel_library([BinarySpec(8, "add"), spec], "cuda", fresh_kernel_cache / "k.so")


def test_build_module_checks_the_target():
    with pytest.raises(BitsmithError, match="QGemvI8Spec"):
        build_module([QGemvI8Spec(64, 576, 4, 32, True, 1)], "cuda")


# --------------------------------------------------------------------------------- CUDA build

# one kernel of every family, with the decode GEMV the GPU is measured on (int4 g32 4096 x 4096)
BUILD_SPECS = [
    GemvSpec(4096, 4096, 4, 32, True, 1), GemvSpec(576, 1536, 3, 128, False, 4), GemvSpec(1536, 576, 16, batch=1),
    GemmSpec(1536, 576, 4, 32, True, 64), BinarySpec(40000, "add"), BiasAddSpec(16, 576, "float16"),
    UnarySpec(576, "gelu"), SiluMulSpec(1536), GeluMulSpec(1536, "tanh"), RmsNormSpec(16, 576, "float16", 1e-5),
    AddRmsNormSpec(1, 576, "float32", 1e-5), LayerNormSpec(4, 576, "float32", 1e-5, True),
    RopeSpec(16, 9, 64, 64, "half"), RopeSpec(1, 3, 64, 32, "interleaved"), EmbeddingSpec(4, 49152, 576, "float16"),
    QEmbeddingSpec(1, 49152, 576, 4, -1, True),
    PagedAttentionSpec(64, 8, 4, 256, 16, 512, 512, 0.0625, 4096, "float16", 50.0, 262),  # Gemma 2: cap, ring
    PagedAttentionSpec(16, 9, 3, 64, 16, 512, 128, 0.125, None, "int4"),
    PagedAttentionSpec(16, 9, 3, 64, 16, 512, 128, 0.125, None, "int8"),
    PagedAttentionSpec(4, 32, 8, 128, 16, 256, 64, 0.088, 4096, "float16"),
]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH (CUDA toolkit not installed)")


def _cuobjdump() -> str | None:
    """cuobjdump on PATH, or from the nvidia-cuda-cuobjdump wheel."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import nvidia
    except ImportError:
        return None
    paths = [p for root in nvidia.__path__ for p in Path(root).glob("cu*/bin/cuobjdump")]
    return str(paths[0]) if paths else None


@pytest.fixture
def fresh_kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BITSMITH_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path


@needs_nvcc
@pytest.mark.parametrize("arch, specs", [("sm_90a", BUILD_SPECS), ("sm_80", BUILD_SPECS[:4] + BUILD_SPECS[-2:])])
def test_cuda_library_builds_with_the_requested_arch(fresh_kernel_cache, arch, specs):
    from bitsmith.codegen.gpu import cuda_build

    path = fresh_kernel_cache / f"cuda_{arch}.so"
    lines = []
    t0 = time.perf_counter()
    report = build_kernel_library(specs, f"cuda_{arch}", path, log=lines.append)
    seconds = time.perf_counter() - t0
    print(f"\n{arch}: {len(specs)} kernels in {seconds:.1f} s, {path.stat().st_size / 1024:.0f} KiB")
    assert report.kernels == report.built == len(specs) and lines == [report.summary()]
    assert fatbin_archs(path) == {arch}
    blobs = _fatbins(path.read_bytes())
    assert len(blobs) == 1 and parse_fatbin_archs(blobs[0]) == {arch}
    cuobjdump = _cuobjdump()
    if cuobjdump is not None:  # the tool agrees with the header parser
        assert cuda_build._cuobjdump_archs(cuobjdump, blobs[0]) == {arch}
    symbols = path.read_bytes()
    assert all(spec.name.encode() in symbols for spec in specs)
    again = build_kernel_library(specs, f"cuda_{arch}", fresh_kernel_cache / "again.so")
    assert again.cached == len(specs) and again.built == 0


@pytest.mark.parametrize("spec", BUILD_SPECS, ids=lambda s: s.name)
def test_scheduled_kernels_fit_the_gpu(spec):
    """Lowered for sm_90a: thread and shared memory limits (no nvcc needed)."""
    import tvm
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    target = cuda_target().tvm_target()
    module = tvm.IRModule({spec.name: spec.prim_func(cuda_target())})
    with target:
        lowered = default_s_tir_pipeline()[0](tvm.tirx.transform.BindTarget(target)(module))
    limits = {"max_threads_per_block": 1024, "max_shared_memory_per_block": 48 << 10}
    assert tvm.s_tir.analysis.verify_gpu_code(lowered[spec.name], limits)


# head_dim = 2 mod 4 and odd (keys read an element at a time: VEC needs head_dim % 4 == 0), and one query head
# per kv head (its softmax step in two phases, see `_softmax_step`), the last as in an MHA model
ODD_BUILD_SPECS = [PagedAttentionSpec(16, 9, 3, 18, 16, 128, 32, 0.25, None, "int4"),
                   PagedAttentionSpec(4, 8, 2, 34, 16, 128, 32, 0.17, 8, "float16"),
                   PagedAttentionSpec(1, 4, 4, 6, 16, 128, 32, 0.4, None, "int8"),
                   PagedAttentionSpec(5, 9, 3, 7, 16, 128, 32, 0.38, None, "float32"),
                   PagedAttentionSpec(16, 32, 32, 128, 16, 256, 64, 0.088, None, "float16")]


@pytest.mark.parametrize("spec", ODD_BUILD_SPECS, ids=lambda s: s.name)
def test_odd_shapes_fit_the_gpu(spec):
    test_scheduled_kernels_fit_the_gpu(spec)


@needs_nvcc
def test_cuda_library_builds_odd_shapes(fresh_kernel_cache):
    report = build_kernel_library(ODD_BUILD_SPECS, "cuda_sm_90a", fresh_kernel_cache / "odd.so")
    assert report.kernels == report.built == len(ODD_BUILD_SPECS)
    symbols = (fresh_kernel_cache / "odd.so").read_bytes()
    assert all(spec.name.encode() in symbols for spec in ODD_BUILD_SPECS)


def test_missing_nvcc_is_explained(fresh_kernel_cache, monkeypatch):
    monkeypatch.setenv("PATH", str(fresh_kernel_cache))
    with pytest.raises(BitsmithError, match="nvcc is not on PATH.*fix: install the CUDA toolkit"):
        build_kernel_library([BinarySpec(8, "add")], "cuda", fresh_kernel_cache / "k.so")


def test_nvcc_failures_are_explained(fresh_kernel_cache, monkeypatch):
    fake = fresh_kernel_cache / "bin" / "nvcc"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'nvcc fatal   : Unsupported gpu architecture' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{Path(shutil.which('cc') or '/usr/bin/cc').parent}")
    with pytest.raises(BitsmithError, match="compiling 1 CUDA kernels failed.*Unsupported gpu architecture"):
        build_kernel_library([BinarySpec(8, "add")], "cuda", fresh_kernel_cache / "k.so")
