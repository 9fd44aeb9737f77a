"""The rotate passes: the fp32 rewrite is exact (same logits), what they refuse, and what they record."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.ir import Module
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, RotationOptions, TargetOptions
from bitsmith.pipeline import compile_model, describe_pipeline
from bitsmith.runtime.artifact import load_artifact
from tests.family_zoo import zoo_model
from tests.tools.test_gate import char_tokenizer

EXACT = dict(dtype="float32", memory=MemoryOptions(kv_dtype="float32"), target=TargetOptions("none"))
TOKENS = [5, 17, 3, 88, 41, 9, 60, 2, 33, 71, 12, 50]


def logits_of(path) -> np.ndarray:
    """Prefill of 8 tokens then 4 decode steps on the reference executor: [12, vocab]."""
    art = load_artifact(path)
    session = ReferenceSession(Module.from_json(art.manifest["ir"]), art.weights, 32)
    return np.concatenate([session.prefill(TOKENS[:8]), np.stack([session.decode(t) for t in TOKENS[8:]])])


def compile_pair(tmp_path, family: str, rotation: RotationOptions, quant: QuantOptions = QuantOptions(), **overrides):
    directory = tmp_path / "model"
    zoo_model(family, **overrides).save_pretrained(directory)
    char_tokenizer(directory)  # outlier channels are measured on calibration text
    plain = compile_model(directory, tmp_path / "plain", CompileOptions(quant=quant, **EXACT))
    rotated = compile_model(directory, tmp_path / "rotated", CompileOptions(quant=quant, rotation=rotation, **EXACT))
    return plain, rotated


@pytest.mark.parametrize("family, overrides", [
    ("llama", {}), ("llama", {"tie_word_embeddings": True}), ("llama", {"intermediate_size": 96}),  # ffn 8 x H12
    ("llama3", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}), ("gemma", {}), ("smollm3", {}),
])
def test_rotated_fp32_model_gives_the_same_logits(tmp_path, family, overrides):
    plain, rotated = compile_pair(tmp_path, family, RotationOptions("hadamard", seed=3), **overrides)
    ref, got = logits_of(plain), logits_of(rotated)
    # the issue's bar: 1e-4 relative to the logits' scale (float32 matmuls in another order)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    meta = load_artifact(rotated).manifest["ir"]["meta"]["rotation"]
    assert meta["r1"]["size"] == 64 and meta["r1"]["orthogonality"] < 1e-12
    assert meta["keys"]["head_dims"] == [16]


def test_rotation_changes_the_weights_and_inserts_online_ops(tmp_path):
    plain, rotated = compile_pair(tmp_path, "llama", RotationOptions("hadamard"), intermediate_size=96)
    a, b = load_artifact(plain), load_artifact(rotated)
    name = "layers.0.self_attn.q_proj.weight"
    assert not np.allclose(a.weights[name], b.weights[name])
    ops = [n["op"] for n in b.manifest["ir"]["functions"]["decode"]["nodes"]]
    assert ops.count("hadamard") == 2 * 3  # per layer: q, k after RoPE and the down_proj input
    assert b.weights["rotation.hadamard12"].dtype == np.float32  # factors stay float32 in any storage dtype


def test_only_the_chosen_online_rotations_are_inserted(tmp_path):
    _, rotated = compile_pair(tmp_path, "llama", RotationOptions("hadamard", ffn=False, keys=False))
    ops = [n["op"] for n in load_artifact(rotated).manifest["ir"]["functions"]["decode"]["nodes"]]
    assert "hadamard" not in ops


def test_a_tied_head_stays_tied_and_its_norm_scale_stays_16_bit(tmp_path):
    """The last norm's scale goes into a hidden x hidden head_norm linear, not into a second copy of the table."""
    quant = QuantOptions("rtn", 4, 32, keep_default=False)
    plain, rotated = compile_pair(tmp_path, "llama", RotationOptions("hadamard"), quant, tie_word_embeddings=True)
    art = load_artifact(rotated)
    plan = art.manifest["ir"]["meta"]["precision_plan"]
    assert plan["head_norm.weight"] is None and plan["layers.0.mlp.down_proj.weight"] is not None
    assert "lm_head.weight" not in art.weights and art.manifest["ir"]["meta"]["rotation"]["head_norm"]
    head_norm = np.asarray(art.weights["head_norm.weight"], dtype=np.float32)
    assert head_norm.shape == (64, 64) and np.allclose(head_norm, head_norm.T, atol=1e-2)  # R1^T diag(g) R1
    extra = sum(np.asarray(w).nbytes for w in art.weights.values()) - sum(
        np.asarray(w).nbytes for w in load_artifact(plain).weights.values())
    assert extra <= 64 * 64 * 4 + 2 * 64 * 64  # the head_norm and the online factors, never a vocab x hidden table


@pytest.mark.parametrize("family, why", [
    ("phi", "rmsnorm or add"),  # LayerNorm on the stream
    ("gemma2", "not a linear"),  # a norm on each writer's output
    ("mixtral", "not a linear.s output"),  # experts write the stream
])
def test_unsupported_shapes_are_refused_by_name(tmp_path, family, why):
    directory = tmp_path / "model"
    zoo_model(family).save_pretrained(directory)
    char_tokenizer(directory)
    with pytest.raises(BitsmithError, match=f"cannot rotate this model.*{why}"):
        compile_model(directory, tmp_path / "out", CompileOptions(rotation=RotationOptions("hadamard"), **EXACT))
    assert not (tmp_path / "out").exists()


def test_pass_list_shows_the_rotate_phase():
    text = describe_pipeline(CompileOptions(rotation=RotationOptions("hadamard")))
    assert ("rotate         find_outlier_channels, fold_norm_scales, choose_rotations, rotate_residual,\n"
            "                 rotate_heads, rotate_ffn_online, rotate_keys_online") in text
    assert "rotate" not in describe_pipeline(CompileOptions())


def test_outlier_channels_stay_unrotated_and_the_rewrite_stays_exact(tmp_path):
    # ratio 1: the most energetic hidden/32 channels count as outliers even in a random model
    plain, rotated = compile_pair(tmp_path, "llama", RotationOptions("hadamard", outlier_ratio=1.0))
    ref, got = logits_of(plain), logits_of(rotated)
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
    channels = load_artifact(rotated).manifest["ir"]["meta"]["rotation"]["outliers"]["channels"]
    assert len(channels) == 2  # 64 / 32
    a, b = load_artifact(plain).weights, load_artifact(rotated).weights
    gamma = "layers.1.input_layernorm.weight"
    rest = np.delete(a[gamma], channels)  # the kept channels leave g / rms(other g) in the norm
    assert np.allclose(b[gamma][channels], a[gamma][channels] / np.sqrt(np.mean(rest ** 2)), rtol=1e-5)
    assert np.all(np.delete(b[gamma], channels) == 1)


def test_rotation_without_calibration_text_is_refused(tmp_path):
    zoo_model("llama").save_pretrained(tmp_path / "model")  # no tokenizer: no calibration tokens
    with pytest.raises(BitsmithError, match="outlier channels needs calibration tokens.*--rotate-outliers 0"):
        compile_model(tmp_path / "model", tmp_path / "out", CompileOptions(rotation=RotationOptions("hadamard"), **EXACT))
    compile_model(tmp_path / "model", tmp_path / "out",  # outlier_ratio 0: every channel rotated, no text needed
                  CompileOptions(rotation=RotationOptions("hadamard", outlier_ratio=0), **EXACT))
