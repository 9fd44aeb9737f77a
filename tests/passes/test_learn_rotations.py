"""learn_rotations: Cayley steps keep R orthogonal, the objective falls from the Hadamard start, the fp32 rewrite
stays exact, --rotate learned composes with RTN and GPTQ, and the low-rank Hessians give the full objective."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, RotationOptions, TargetOptions
from bitsmith.passes.quant.learned_rotation import (
    LowRankHessian, Objective, Term, cayley_step, factor_activations, learn_rotations, reorthogonalize, rotate_cols,
    rotate_rows, rtn_error,
)
from bitsmith.passes.quant.rotation import random_hadamard, random_orthogonal
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.pipeline import compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.quant_scheme import QuantScheme, dequantize
from tests.family_zoo import zoo_model
from tests.tools.test_gate import char_tokenizer

EXACT = dict(dtype="float32", memory=MemoryOptions(kv_dtype="float32"), target=TargetOptions("none"))
TOKENS = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]
LEARNED = RotationOptions("learned", seed=3, learn_steps=12)
DATA = Path(os.environ.get("BITSMITH_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


def test_cayley_steps_stay_orthogonal_and_descend():
    # f(R) = ||R - T||^2 for an orthogonal target T: each step must lower it and keep R R^T = I
    target, r = random_orthogonal(24, 1), random_orthogonal(24, 2)
    losses = []
    for _ in range(30):
        losses.append(float(((r - target) ** 2).sum()))
        r = cayley_step(r, 2 * (r - target), 0.05)
    assert np.abs(r @ r.T - np.eye(24)).max() < 1e-12
    assert losses[-1] < 0.5 * losses[0] and all(b <= a + 1e-12 for a, b in zip(losses, losses[1:]))


def test_drifted_rotation_is_reorthogonalized():
    r = random_orthogonal(16, 0)
    kept, drift = reorthogonalize(r)
    assert kept is r and drift < 1e-12
    fixed, drift = reorthogonalize(r + 1e-3 * np.random.default_rng(0).standard_normal((16, 16)))
    assert drift > 1e-5 and np.abs(fixed @ fixed.T - np.eye(16)).max() < 1e-12
    assert np.abs(fixed - r).max() < 1e-2  # the nearest-ish orthogonal matrix, not another one


def exact_scale_weight(groups: list[int], sym: bool, seed: int = 4) -> np.ndarray:
    """[20, sum(groups)] weights whose groups have power-of-two int4 scales and an integer zero (asym: min = -8 s,
    max = 7 s too), so the fp16 scales the quantizer stores are exact and the two RTNs must agree."""
    rng = np.random.default_rng(seed)
    parts = []
    for g in groups:
        s = 2.0 ** -rng.integers(1, 5, size=(20, 1))
        part = s * rng.uniform(-7.9, 6.9, size=(20, g))
        part[:, 0], part[:, -1] = 7 * s[:, 0], -8 * s[:, 0]
        parts.append(part)
    return np.concatenate(parts, axis=1).astype(np.float32)


@pytest.mark.parametrize("group, sym", [(32, True), (-1, True), (32, False), (-1, False)])
def test_rtn_error_is_the_quantizers_error(group, sym):
    w = exact_scale_weight([80] if group == -1 else [32, 32, 32], sym)
    got = rtn_error(torch.from_numpy(w), w.shape[1] if group == -1 else group, 4, sym).numpy()
    want = dequantize(quantize_rtn(w, QuantScheme(4, group, sym, "rtn"))) - w
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_rtn_error_takes_a_last_partial_group_alone():
    w = exact_scale_weight([32, 32, 16], True)  # 80 columns in groups of 32: the last one has 16
    got = rtn_error(torch.from_numpy(w), 32, 4, True).numpy()
    want = np.concatenate([dequantize(quantize_rtn(w[:, :64], QuantScheme(4, 32, True, "rtn"))),
                           dequantize(quantize_rtn(w[:, 64:], QuantScheme(4, -1, True, "rtn")))], axis=1) - w
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_rtn_error_gradient_reaches_only_the_group_range():
    # straight-through rounding: Q(y) - y depends on y only through each group's scale (its max/min element)
    w = torch.from_numpy(exact_scale_weight([32], True)).requires_grad_(True)
    rtn_error(w, 32, 4, True).sum().backward()
    nonzero = (w.grad != 0).sum(dim=1)
    assert bool((nonzero <= 2).all()) and bool((nonzero >= 1).all())


def test_objective_falls_from_the_hadamard_start_on_an_outlier_channel():
    # a reader of the stream whose input has one 20x channel: what a rotation (and a better one) spreads out
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 32)).astype(np.float32)
    x[:, 5] *= 20
    w = rng.standard_normal((48, 32)).astype(np.float32)
    w[:, 9] *= 10
    terms = [Term(w, "x", None, "r1", 32, 3, True, 0), Term(w[:16] * 0.5, "x", None, "r1", 8, 3, True, 1)]
    objective = Objective(terms, {"x": x.T @ x})
    start = {"r1": random_hadamard(32, 0)}
    learned, report = learn_rotations(objective, start, steps=40, lr=0.2, batches_per_step=2, seed=0)
    assert report["kept"] and report["after"] < 0.9 * report["before"]
    assert report["before"] == pytest.approx(float(objective.term_errors(start).mean()))
    assert report["after"] == pytest.approx(float(objective.term_errors(learned).mean()))
    assert np.abs(learned["r1"] @ learned["r1"].T - np.eye(32)).max() < 1e-10


def test_learning_that_does_not_help_keeps_the_start():
    w = np.random.default_rng(1).standard_normal((8, 16)).astype(np.float32)
    objective = Objective([Term(w, "x", None, "r1", 16, 4, True, 0)], {"x": np.eye(16, dtype=np.float32)})
    start = {"r1": random_hadamard(16, 0)}
    learned, report = learn_rotations(objective, start, steps=4, lr=1e4, batches_per_step=1, seed=0)  # lr: chaos
    assert len(report["checkpoints"]) == 5 and report["after"] == min(report["checkpoints"])
    if not report["kept"]:
        assert np.array_equal(learned["r1"], start["r1"]) and report["after"] == report["before"]
    assert report["after"] <= report["before"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny") / "model"
    zoo_model("llama", intermediate_size=96).save_pretrained(directory)  # ffn 96 = 8 x Paley 12: a dense factor
    char_tokenizer(directory)
    return directory


def logits_of(path) -> np.ndarray:
    """Prefill of 8 tokens then 4 decode steps on the reference executor: [12, vocab]."""
    art = load_artifact(path)
    session = ReferenceSession(Module.from_json(art.manifest["ir"]), art.weights, 32)
    return np.concatenate([session.prefill(TOKENS[:8]), np.stack([session.decode(t) for t in TOKENS[8:]])])


def test_learned_fp32_model_gives_the_same_logits(tiny_llama, tmp_path):
    plain = compile_model(tiny_llama, tmp_path / "plain", CompileOptions(**EXACT))
    learned = compile_model(tiny_llama, tmp_path / "learned", CompileOptions(rotation=LEARNED, **EXACT))
    hadamard = compile_model(tiny_llama, tmp_path / "hadamard",
                             CompileOptions(rotation=RotationOptions("hadamard", seed=3), **EXACT))
    ref, got = logits_of(plain), logits_of(learned)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()  # the bar (hadamard: ~1e-6)
    meta = load_artifact(learned).manifest["ir"]["meta"]["rotation"]
    report = meta["learned"]
    assert report["r1_orthogonality"] < 1e-5 and report["r2_orthogonality"] < 1e-5
    assert report["kept"] and report["after"] < report["before"]  # nothing quantized: the default int4 g128 stands in
    name = "layers.0.self_attn.q_proj.weight"  # the learned R1 is not the Hadamard start
    assert not np.allclose(load_artifact(learned).weights[name], load_artifact(hadamard).weights[name], atol=1e-4)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tiny_model_compiles_with_learned_rotation_and_quantization(tiny_llama, tmp_path, method):
    quant = QuantOptions(method, 3, 32, keep_default=False)
    plain = compile_model(tiny_llama, tmp_path / "plain", CompileOptions(**EXACT))
    out = compile_model(tiny_llama, tmp_path / "q", CompileOptions(quant=quant, rotation=LEARNED, **EXACT))
    art = load_artifact(out)
    plan, report = art.manifest["ir"]["meta"]["precision_plan"], art.manifest["ir"]["meta"]["rotation"]["learned"]
    quantized = [name for name, scheme in plan.items() if scheme]
    assert report["terms"] == len(quantized) == 15  # 2 layers x q, k, v, o, gate, up, down, and the lm_head
    assert report["after"] <= report["before"]
    ref, got = logits_of(plain), logits_of(out)
    # int3: not exact, but the same model (a wrong fold would give unrelated logits)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9


def test_learned_rotation_needs_calibration_tokens(tmp_path):
    zoo_model("llama").save_pretrained(tmp_path / "model")  # no tokenizer: no calibration text
    with pytest.raises(BitsmithError, match="needs calibration tokens"):
        compile_model(tmp_path / "model", tmp_path / "out", CompileOptions(rotation=LEARNED, **EXACT))


@pytest.mark.slow
def test_tinystories_learned_fp32_logits_equal_the_original(tmp_path):
    source = DATA / "tinystories-656k"
    if not (source / "model.safetensors").exists():
        pytest.skip(f"TinyStories-656K not found under {DATA}")
    plain = compile_model(source, tmp_path / "plain", CompileOptions(**EXACT))
    learned = compile_model(source, tmp_path / "learned", CompileOptions(rotation=LEARNED, **EXACT))
    ref, got = logits_of(plain), logits_of(learned)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()


def test_cayley_step_leaves_fixed_channels_alone():
    rng = np.random.default_rng(0)
    r = np.eye(8)
    r[2:, 2:] = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    stepped = cayley_step(r, rng.standard_normal((8, 8)), 0.5, fixed=np.array([0, 1]))
    assert np.allclose(stepped[:2], np.eye(8)[:2]) and np.allclose(stepped[:, :2], np.eye(8)[:, :2])
    assert np.abs(stepped @ stepped.T - np.eye(8)).max() < 1e-10 and not np.allclose(stepped, r)


def test_learned_rotation_keeps_outlier_channels_exact(tiny_llama, tmp_path):
    # ratio 1: the two most energetic channels are outliers; R1 must stay the identity there (their norm scale is
    # partly unfolded), or the rewrite is no longer exact
    plain = compile_model(tiny_llama, tmp_path / "plain", CompileOptions(**EXACT))
    learned = compile_model(tiny_llama, tmp_path / "learned",
                            CompileOptions(rotation=dataclasses.replace(LEARNED, outlier_ratio=1.0), **EXACT))
    ref, got = logits_of(plain), logits_of(learned)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    assert len(load_artifact(learned).manifest["ir"]["meta"]["rotation"]["outliers"]["channels"]) == 2


def spectrum_activations(tokens: int, n: int, rank: int | None = None, seed: int = 0, decay: float = 0.7,
                         outlier: float = 20.0) -> np.ndarray:
    """[tokens, n] activations with singular values ~ j^-decay and one `outlier`x channel (an LLM's input, in
    small); `rank`: only that many independent directions, plus the outlier's."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((n, n)))[0]
    scales = 1.0 / np.arange(1, n + 1) ** decay
    if rank is not None:
        scales[rank:] = 0
    x = (rng.standard_normal((tokens, n)) * scales) @ basis.T
    x[:, 3] += outlier * scales[0] * rng.standard_normal(tokens)
    return x.astype(np.float32)


def head_terms(seed: int = 0) -> list[Term]:
    """A reader (R1 on its input), a v_proj (R2 rows, R1 input), an o_proj (R1 rows, R2 input) and a down_proj
    (R1 rows, its input unrotated): every way a rotation reaches a weight and its Hessian."""
    rng = np.random.default_rng(seed)

    def w(rows: int, cols: int) -> np.ndarray:
        return rng.standard_normal((rows, cols)).astype(np.float32)

    return [Term(w(48, 32), "x", None, "r1", 16, 3, True, 0), Term(w(32, 32), "x", "r2", "r1", 16, 3, True, 0),
            Term(w(32, 32), "o", "r1", "r2", 16, 3, True, 1), Term(w(32, 64), "d", "r1", None, 32, 3, False, 1)]


def dense_term_errors(terms: list[Term], hessians: dict[str, np.ndarray], rots64: dict) -> np.ndarray:
    """tr(E Rin^T S Rin E^T) / tr(W S W^T) in float64 with the full S: the reference for the factored form."""
    rots = {k: torch.from_numpy(v.astype(np.float32)) for k, v in rots64.items()}
    out = []
    for t in terms:
        s = hessians[t.hessian].astype(np.float64)
        if t.cols == "r1":
            s = rots64["r1"].T @ s @ rots64["r1"]
        elif t.cols == "r2":
            r2 = np.kron(np.eye(s.shape[0] // rots64["r2"].shape[0]), rots64["r2"])
            s = r2.T @ s @ r2
        y = rotate_cols(rotate_rows(torch.from_numpy(t.weight), t.rows, rots), t.cols, rots)
        e = rtn_error(y, t.group, t.bits, t.sym).double().numpy()
        w = t.weight.astype(np.float64)
        out.append(np.trace(e @ s @ e.T) / np.trace(w @ hessians[t.hessian].astype(np.float64) @ w.T))
    return np.array(out)


ROTS = {"r1": random_hadamard(32, 1), "r2": random_hadamard(8, 2)}


@pytest.mark.parametrize("tokens, rank, cap", [
    (24, None, None),  # tokens < in: X^T itself
    (24, None, 24),  # ... at the cap
    (40, 20, 24),  # rank 21 <= cap < tokens: the top of d's [tokens, tokens] Gram, and of x's, o's X^T X
    (300, None, None),  # tokens > in: X^T X's eigh
    (300, 5, 8),  # rank 6 <= cap 8 << in: the randomized subspace iteration finds the range whole
])
def test_low_rank_objective_equals_the_full_one_at_full_rank(tokens, rank, cap):
    terms = head_terms()
    xs = {"x": spectrum_activations(tokens, 32, rank, 1), "o": spectrum_activations(tokens, 32, rank, 2),
          "d": spectrum_activations(tokens, 64, rank, 3)}
    factors = {k: factor_activations(x, cap) for k, x in xs.items()}
    for k, f in factors.items():
        assert f.rank == min(xs[k].shape[1], tokens, cap or tokens)
        assert f.tail < 1e-4 * float((xs[k].astype(np.float64) ** 2).sum()) / xs[k].shape[1]  # nothing dropped
    got = Objective(terms, factors).term_errors(ROTS)
    want = dense_term_errors(terms, {k: x.T @ x for k, x in xs.items()}, ROTS)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_capped_objective_stays_close_to_the_full_one():
    # rank 8 of 32 and 64 on a flat spectrum (j^-0.5, no outlier: the hard case), exact signals as the pass gives:
    # measured <= 1.2% per term and 0.3% on the mean with the tail; without it the errors are 41-48% low
    terms = head_terms()
    xs = {k: spectrum_activations(512, n, None, seed, decay=0.5, outlier=0.0)
          for k, n, seed in (("x", 32, 1), ("o", 32, 2), ("d", 64, 3))}
    signals = [float(np.square(xs[t.hessian].astype(np.float64) @ t.weight.T).sum()) for t in terms]
    want = dense_term_errors(terms, {k: x.T @ x for k, x in xs.items()}, ROTS)
    capped = {k: factor_activations(x, 8) for k, x in xs.items()}
    got = Objective(terms, capped, signals).term_errors(ROTS)
    np.testing.assert_allclose(got, want, rtol=0.03)
    assert got.mean() == pytest.approx(want.mean(), rel=0.01)
    no_tail = Objective(terms, {k: LowRankHessian(f.factor) for k, f in capped.items()}, signals).term_errors(ROTS)
    assert (no_tail / want < 0.7).all()  # what the tail buys


def test_objective_memory_is_the_factors_bytes_and_bounded_by_the_cap():
    terms = head_terms()
    xs = {"x": spectrum_activations(300, 32), "o": spectrum_activations(300, 32), "d": spectrum_activations(300, 64)}
    sizes = {}
    for cap in (4, 16, 32, 64, 1000):
        sizes[cap] = Objective(terms, {k: factor_activations(x, cap) for k, x in xs.items()}).bytes
        assert sizes[cap] == sum(x.shape[1] * min(x.shape[1], 300, cap) * 4 for x in xs.values())
    assert sizes[4] < sizes[16] < sizes[32] < sizes[64] == sizes[1000]


@pytest.mark.parametrize("cap", [16, 96, 4096])
def test_pass_reports_the_factors_bytes(tiny_llama, tmp_path, cap):
    # tiny llama: per layer q/k/v, o, gate/up (64) and down (96) inputs, and the lm_head's (64); 4096 tokens
    out = compile_model(tiny_llama, tmp_path / "out", CompileOptions(
        rotation=RotationOptions("learned", seed=3, learn_steps=2, learn_rank=cap), **EXACT))
    report = load_artifact(out).manifest["ir"]["meta"]["rotation"]["learned"]
    inputs = [64, 64, 64, 96] * 2 + [64]
    assert report["hessian_rank_cap"] == cap
    assert report["hessian_bytes"] == sum(n * min(n, report["calibration_tokens"], cap) * 4 for n in inputs)
    assert report["hessian_bytes"] <= len(inputs) * 96 * cap * 4
