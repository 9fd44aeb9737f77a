"""Elementwise, norm, rope and embedding kernels against the numpy references of the IR ops registry.

Tolerances: EXACT (rtol 1e-5, atol 1e-6) for ops with one rounding per element or only a reordered
fp32 sum (add, mul, bias add, relu, embeddings, norms); TRANSCENDENTAL (rtol 1e-4, atol 1e-6) for
silu/gelu, whose exp/erf/tanh differ from numpy's by a few ulp; ROPE (rtol 1e-5, atol 1e-5, x ~ N(0, 1))
for cos/sin of float32 angles up to 8192 rad (libm in the kernel vs numpy's own float32 sin/cos).
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from bitsmith.codegen.common import PARALLEL_MIN
from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.kernel import KernelSpec, build_module, call_kernel
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.target import cross_target, host_target
from bitsmith.compiler.ops import OPS
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.compiler.ops.quant import dequantize_packed
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import pack

EXACT = dict(rtol=1e-5, atol=1e-6)
TRANSCENDENTAL = dict(rtol=1e-4, atol=1e-6)
ROPE = dict(rtol=1e-5, atol=1e-5)
DTYPES = ("float32", "float16")
BIG = PARALLEL_MIN + 7232  # 40000 elements: the multi-threaded path (and a scalar remainder)


def ref(op: str, inputs: list[np.ndarray], **attrs) -> np.ndarray:
    with np.errstate(over="ignore"):  # silu's exp(-x) overflows to inf for x < -88, as intended
        return OPS[op].ref(inputs, attrs, None)[0]


def rng_for(spec) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(spec.name.encode()))


def normal(rng, shape, dtype="float32", scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(dtype)


def out(*shape) -> np.ndarray:
    return np.full(shape, np.nan, np.float32)


# --------------------------------------------------------------------------------- norms

NORM_SHAPES = [(r, d) for r in (1, 3, 16) for d in (1, 7, 65, 576)] + [(64, 576)]
RMS_SPECS = [RmsNormSpec(r, d, dt, 1e-5) for r, d in NORM_SHAPES for dt in DTYPES]
RMS_SPECS += [RmsNormSpec(3, 64, "float32", 1e-6)]


@pytest.mark.parametrize("spec", RMS_SPECS, ids=lambda s: s.name)
def test_rmsnorm(spec):
    rng = rng_for(spec)
    x = normal(rng, (spec.rows, spec.dim), scale=3.0)
    w = normal(rng, (spec.dim,), spec.weight_dtype)
    y = call_kernel(spec, [x, w], [out(spec.rows, spec.dim)])[0]
    np.testing.assert_allclose(y, ref("rmsnorm", [x, w], eps=spec.eps), **EXACT)


ADD_RMS_SPECS = [AddRmsNormSpec(r, d, dt, 1e-6) for r, d in [(1, 7), (3, 65), (16, 576), (64, 576)] for dt in DTYPES]


@pytest.mark.parametrize("spec", ADD_RMS_SPECS, ids=lambda s: s.name)
def test_add_rmsnorm(spec):
    rng = rng_for(spec)
    x, res = normal(rng, (spec.rows, spec.dim)), normal(rng, (spec.rows, spec.dim), scale=4.0)
    w = normal(rng, (spec.dim,), spec.weight_dtype)
    total, y = call_kernel(spec, [x, res, w], [out(spec.rows, spec.dim), out(spec.rows, spec.dim)])
    expected_sum = ref("add", [x, res])
    np.testing.assert_array_equal(total, expected_sum)
    np.testing.assert_allclose(y, ref("rmsnorm", [expected_sum, w], eps=spec.eps), **EXACT)


LN_SPECS = [LayerNormSpec(r, d, "float32", 1e-5, True) for r, d in NORM_SHAPES]
LN_SPECS += [LayerNormSpec(r, d, "float16", 1e-5, bias) for r, d in [(1, 7), (3, 65), (16, 576)]
             for bias in (True, False)]


@pytest.mark.parametrize("spec", LN_SPECS, ids=lambda s: s.name)
def test_layernorm(spec):
    rng = rng_for(spec)
    x = normal(rng, (spec.rows, spec.dim), scale=2.0) + np.float32(1.5)  # a mean to subtract
    params = [normal(rng, (spec.dim,), spec.weight_dtype) for _ in range(1 + spec.has_bias)]
    y = call_kernel(spec, [x, *params], [out(spec.rows, spec.dim)])[0]
    np.testing.assert_allclose(y, ref("layernorm", [x, *params], eps=spec.eps), **EXACT)


# --------------------------------------------------------------------------------- elementwise

BINARY_SPECS = [BinarySpec(n, op) for n in (1, 7, 65, 576, BIG) for op in ("add", "mul")]


@pytest.mark.parametrize("spec", BINARY_SPECS, ids=lambda s: s.name)
def test_binary(spec):
    rng = rng_for(spec)
    a, b = normal(rng, spec.n), normal(rng, spec.n)
    y = call_kernel(spec, [a, b], [out(spec.n)])[0]
    np.testing.assert_allclose(y, ref(spec.op, [a, b]), **EXACT)


BIAS_SPECS = [BiasAddSpec(r, n, dt) for r, n in [(1, 7), (3, 65), (16, 576), (64, 576), (1, BIG)] for dt in DTYPES]


@pytest.mark.parametrize("spec", BIAS_SPECS, ids=lambda s: s.name)
def test_bias_add(spec):
    rng = rng_for(spec)
    x, b = normal(rng, (spec.rows, spec.n)), normal(rng, (spec.n,), spec.bias_dtype)
    y = call_kernel(spec, [x, b], [out(spec.rows, spec.n)])[0]
    np.testing.assert_allclose(y, ref("add", [x, b]), **EXACT)


def _activation_ref(op: str, x: np.ndarray) -> np.ndarray:
    if op == "relu":  # no relu op in the registry (lower_to_kernels maps one): numpy's maximum
        return np.maximum(x, np.float32(0))
    if op.startswith("gelu"):
        return ref("gelu", [x], approximate="tanh" if op == "gelu_tanh" else "none")
    return ref(op, [x])


def _activation_input(rng, n: int) -> np.ndarray:
    x = normal(rng, n, scale=4.0)
    extremes = np.float32([-100.0, -30.0, 0.0, 30.0, 100.0])[: n]
    x[: len(extremes)] = extremes  # exp overflow (silu), saturated erf/tanh (gelu)
    return x


UNARY_SPECS = [UnarySpec(n, op) for op in ("silu", "gelu", "gelu_tanh", "relu") for n in (1, 7, 65, 576)]
UNARY_SPECS += [UnarySpec(BIG, "silu")]


@pytest.mark.parametrize("spec", UNARY_SPECS, ids=lambda s: s.name)
def test_unary(spec):
    x = _activation_input(rng_for(spec), spec.n)
    y = call_kernel(spec, [x], [out(spec.n)])[0]
    np.testing.assert_allclose(y, _activation_ref(spec.op, x), **(EXACT if spec.op == "relu" else TRANSCENDENTAL))


GATED_SPECS = [SiluMulSpec(n) for n in (1, 7, 65, 576, BIG)]
GATED_SPECS += [GeluMulSpec(n, a) for n in (7, 576) for a in ("none", "tanh")]


@pytest.mark.parametrize("spec", GATED_SPECS, ids=lambda s: s.name)
def test_gated(spec):
    rng = rng_for(spec)
    gate, up = _activation_input(rng, spec.n), normal(rng, spec.n)
    y = call_kernel(spec, [gate, up], [out(spec.n)])[0]
    op = "silu" if isinstance(spec, SiluMulSpec) else ("gelu_tanh" if spec.approximate == "tanh" else "gelu")
    np.testing.assert_allclose(y, ref("mul", [_activation_ref(op, gate), up]), **TRANSCENDENTAL)


# --------------------------------------------------------------------------------- rope

ROPE_SHAPES = [(1, 2, 64, 64), (3, 4, 80, 32), (16, 2, 16, 16), (3, 1, 7, 4), (5, 3, 96, 64), (64, 8, 64, 64)]
ROPE_SPECS = [RopeSpec(*shape, style) for shape in ROPE_SHAPES for style in ("half", "interleaved")]


def _rope_case(spec, positions: np.ndarray, theta: float = 10000.0):
    rng = rng_for(spec)
    x = normal(rng, (spec.rows, spec.heads, spec.head_dim))
    inv = rope_inv_freq(spec.rotary_dim, theta, None)
    y = call_kernel(spec, [x, positions, inv], [out(spec.rows, spec.heads, spec.head_dim)])[0]
    return x, y


@pytest.mark.parametrize("spec", ROPE_SPECS, ids=lambda s: s.name)
def test_rope(spec):
    positions = rng_for(spec).integers(0, 8193, spec.rows).astype(np.int64)
    positions[0] = 8192
    x, y = _rope_case(spec, positions)
    expected = ref("rope", [x, positions], theta=10000.0, rotary_dim=spec.rotary_dim, style=spec.style)
    np.testing.assert_allclose(y, expected, **ROPE)
    np.testing.assert_array_equal(y[..., spec.rotary_dim:], x[..., spec.rotary_dim:])


def test_rope_takes_negative_positions_of_padding_rows():
    spec = RopeSpec(3, 2, 64, 64, "half")
    positions = np.array([5, -1, -(1 << 40)], np.int64)
    x, y = _rope_case(spec, positions)
    expected = ref("rope", [x[:1], positions[:1]], theta=10000.0, rotary_dim=64, style="half")
    np.testing.assert_allclose(y[:1], expected, **ROPE)  # the real row is unaffected


# --------------------------------------------------------------------------------- embeddings

EMB_SPECS = [EmbeddingSpec(r, v, d, dt) for r, v, d in [(1, 50, 7), (3, 50, 65), (16, 100, 576), (64, 100, 576)]
             for dt in DTYPES]


@pytest.mark.parametrize("spec", EMB_SPECS, ids=lambda s: s.name)
def test_embedding(spec):
    rng = rng_for(spec)
    table = normal(rng, (spec.vocab, spec.dim), spec.dtype)
    ids = rng.integers(0, spec.vocab, spec.rows).astype(np.int64)
    ids[0] = spec.vocab - 1
    y = call_kernel(spec, [table, ids], [out(spec.rows, spec.dim)])[0]
    np.testing.assert_allclose(y, ref("embedding", [table, ids]), **EXACT)


def test_embedding_clamps_out_of_range_ids():
    spec = EmbeddingSpec(4, 10, 65, "float32")
    table = normal(np.random.default_rng(0), (10, 65))
    ids = np.array([-5, 10, 1 << 40, 3], np.int64)
    y = call_kernel(spec, [table, ids], [out(4, 65)])[0]
    np.testing.assert_array_equal(y, table[[0, 9, 9, 3]])


# dims: 200 (b4: 1 block + 72-value tail; b8: 3 + 8; b2/b3: tail only, 32 does not divide 200),
# 600 (b2: 2 blocks + tail, b3: 1 block + tail), 1024 (whole blocks for every width)
QEMB_SPECS = [QEmbeddingSpec(3, 40, d, b, g, sym) for b in (2, 3, 4, 8) for g in (32, -1) for sym in (True, False)
              for d in (200, 600)]
QEMB_SPECS += [QEmbeddingSpec(1, 40, 1024, b, 128, False) for b in (2, 3, 4, 8)]
QEMB_SPECS += [QEmbeddingSpec(64, 40, 600, 4, 64, True), QEmbeddingSpec(2, 40, 7, 3, 32, False)]


def _qemb_case(spec, rng):
    q = rng.integers(0, 1 << spec.bits, (spec.vocab, spec.dim), dtype=np.uint8)
    scales = (rng.random((spec.vocab, spec.n_groups)) * 0.05 + 0.005).astype(np.float16)
    zeros = None if spec.sym else (rng.random((spec.vocab, spec.n_groups)) * ((1 << spec.bits) - 1)).astype(np.float16)
    table = dequantize_packed(pack(q, spec.bits), scales, zeros,
                              {"bits": spec.bits, "group_size": spec.group_size, "in_features": spec.dim})
    return [pack(q, spec.bits), scales] + ([] if zeros is None else [zeros]), table


@pytest.mark.parametrize("spec", QEMB_SPECS, ids=lambda s: s.name)
def test_quantized_embedding(spec):
    rng = rng_for(spec)
    params, table = _qemb_case(spec, rng)
    ids = rng.integers(0, spec.vocab, spec.rows).astype(np.int64)
    ids[0] = spec.vocab - 1  # the last row of the buffer (an overread would leave it)
    y = call_kernel(spec, [*params, ids], [out(spec.rows, spec.dim)])[0]
    np.testing.assert_allclose(y, ref("embedding", [table, ids]), **EXACT)


def test_quantized_embedding_clamps_out_of_range_ids():
    spec = QEmbeddingSpec(3, 40, 200, 4, 32, False)
    params, table = _qemb_case(spec, np.random.default_rng(1))
    ids = np.array([-1, 40, 7], np.int64)
    y = call_kernel(spec, [*params, ids], [out(3, 200)])[0]
    np.testing.assert_allclose(y, table[[0, 39, 7]], **EXACT)


# --------------------------------------------------------------------------------- protocol

ALL_SPECS = (RMS_SPECS + ADD_RMS_SPECS + LN_SPECS + BINARY_SPECS + BIAS_SPECS + UNARY_SPECS + GATED_SPECS
             + ROPE_SPECS + EMB_SPECS + QEMB_SPECS)


def test_names_are_unique_c_symbols():
    names = [spec.name for spec in ALL_SPECS]
    assert len(set(names)) == len(set(ALL_SPECS)) == len(names)
    assert all(name.isidentifier() for name in names)
    assert RmsNormSpec(16, 576, "float16", 1e-5).name == "rmsnorm_f16_r16_d576_eps1em05"
    assert QEmbeddingSpec(1, 49152, 576, 4, -1, True).name == "qembedding_b4_gch_sym_r1_v49152_d576"
    assert RopeSpec(1, 9, 64, 64, "half").name != RopeSpec(1, 9, 64, 64, "interleaved").name
    assert LayerNormSpec(1, 8, "float32", 1e-5, True).name != LayerNormSpec(1, 8, "float32", 1e-5, False).name


def test_specs_follow_the_protocol():
    target = host_target()
    for spec in (RmsNormSpec(3, 65, "float16", 1e-5), RopeSpec(3, 1, 7, 4, "interleaved"), QEmbeddingSpec(1, 4, 7, 3)):
        assert isinstance(spec, KernelSpec)
        assert spec.prim_func(target).attrs["global_symbol"] == spec.name


@pytest.mark.parametrize("make", [
    lambda: RmsNormSpec(0, 64, "float32", 1e-5), lambda: RmsNormSpec(1, 64, "int8", 1e-5),
    lambda: LayerNormSpec(1, 64, "float32", -1.0), lambda: BinarySpec(8, "sub"), lambda: UnarySpec(8, "erf"),
    lambda: GeluMulSpec(8, "erf"), lambda: RopeSpec(1, 1, 8, 10), lambda: RopeSpec(1, 1, 8, 3),
    lambda: RopeSpec(1, 1, 8, 8, "neox"), lambda: EmbeddingSpec(1, 0, 8), lambda: QEmbeddingSpec(1, 8, 8, 5),
    lambda: QEmbeddingSpec(1, 8, 8, 4, 48), lambda: QEmbeddingSpec(1, 8, 0, 4), lambda: BiasAddSpec(1, 8, "int8"),
    lambda: EmbeddingSpec(1, 1 << 20, 1 << 11),
])
def test_unsupported_specs_are_refused(make):
    with pytest.raises(BitsmithError, match="cannot build a"):
        make()


def test_every_family_builds_for_aarch64():
    """4-lane vectors and the generic CPU: the schedules must not assume 16 lanes."""
    specs = [RmsNormSpec(3, 65, "float16", 1e-5), AddRmsNormSpec(64, 576, "float32", 1e-5),
             LayerNormSpec(3, 576, "float32", 1e-5, True), BinarySpec(BIG, "add"), BiasAddSpec(3, 65, "float16"),
             UnarySpec(65, "gelu"), SiluMulSpec(576), GeluMulSpec(7), RopeSpec(3, 4, 80, 32, "half"),
             RopeSpec(3, 4, 80, 32, "interleaved"), EmbeddingSpec(3, 50, 65, "float16"),
             QEmbeddingSpec(3, 40, 600, 3, 32, False), QEmbeddingSpec(3, 40, 200, 4, -1, True)]
    asm = build_module(specs, cross_target("aarch64-linux")).mod.inspect_source("asm")
    assert all(spec.name in asm for spec in specs)
