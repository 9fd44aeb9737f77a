"""llama2.c frontend: random v0 checkpoints round-trip, q/k rows land in rotate_half order, bad files fail."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from bitsmith.compiler.frontends.llama2c import load_llama2c
from bitsmith.errors import BitsmithError

DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB, SEQ = 16, 24, 2, 4, 2, 262, 8
HEAD_DIM = DIM // HEADS


def write_tok(path: Path, vocab: int = VOCAB) -> bytes:
    """A tok*.bin with <unk>, BOS, EOS, 256 byte pieces and filler pieces up to `vocab`."""
    pieces = [b"<unk>", b"\n<s>\n", b"\n</s>\n"] + [f"<0x{b:02X}>".encode() for b in range(256)]
    pieces += [f"p{i}".encode() for i in range(vocab - len(pieces))]
    data = struct.pack("<i", 6) + b"".join(struct.pack("<fi", -float(i), len(p)) + p for i, p in enumerate(pieces))
    path.write_bytes(data)
    return data


def write_checkpoint(path: Path, shared: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    """A random legacy-v0 llama2.c checkpoint; returns its arrays by llama2.c name."""
    rng = np.random.default_rng(seed)
    kv = KV_HEADS * HEAD_DIM
    shapes = [
        ("token_embedding", (VOCAB, DIM)), ("rms_att", (LAYERS, DIM)), ("wq", (LAYERS, DIM, DIM)),
        ("wk", (LAYERS, kv, DIM)), ("wv", (LAYERS, kv, DIM)), ("wo", (LAYERS, DIM, DIM)),
        ("rms_ffn", (LAYERS, DIM)), ("w1", (LAYERS, HIDDEN, DIM)), ("w2", (LAYERS, DIM, HIDDEN)),
        ("w3", (LAYERS, HIDDEN, DIM)), ("rms_final", (DIM,)), ("freq_real", (SEQ, HEAD_DIM // 2)),
        ("freq_imag", (SEQ, HEAD_DIM // 2)),
    ] + ([] if shared else [("wcls", (VOCAB, DIM))])
    arrays = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes}
    header = struct.pack("<7i", DIM, HIDDEN, LAYERS, HEADS, KV_HEADS, VOCAB if shared else -VOCAB, SEQ)
    path.write_bytes(header + b"".join(a.astype("<f4").tobytes() for a in arrays.values()))
    return arrays


def to_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Independent formula: HF row h*hd + j holds llama2.c row h*hd + 2j (j < hd/2) or h*hd + 2(j - hd/2) + 1."""
    hd = w.shape[0] // n_heads
    rows = [h * hd + (2 * j if j < hd // 2 else 2 * (j - hd // 2) + 1) for h in range(n_heads) for j in range(hd)]
    return w[rows]


@pytest.mark.parametrize("shared", [True, False])
def test_roundtrip(tmp_path, shared):
    arrays = write_checkpoint(tmp_path / "model.bin", shared=shared)
    tok_bytes = write_tok(tmp_path / "tok262.bin")
    ckpt = load_llama2c(tmp_path / "model.bin")
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        DIM, HIDDEN, LAYERS, HEADS, KV_HEADS)
    assert (cfg.vocab_size, cfg.head_dim, cfg.max_position, cfg.rope_style) == (VOCAB, HEAD_DIM, SEQ, "half")
    assert cfg.tie_word_embeddings is shared and cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-5
    w = ckpt.weights
    assert all(a.dtype == np.float32 for a in w.values())
    np.testing.assert_array_equal(w["embed_tokens.weight"], arrays["token_embedding"])
    for i in range(LAYERS):
        p = f"layers.{i}."
        np.testing.assert_array_equal(w[p + "self_attn.q_proj.weight"], to_rotate_half(arrays["wq"][i], HEADS))
        np.testing.assert_array_equal(w[p + "self_attn.k_proj.weight"], to_rotate_half(arrays["wk"][i], KV_HEADS))
        np.testing.assert_array_equal(w[p + "self_attn.v_proj.weight"], arrays["wv"][i])
        np.testing.assert_array_equal(w[p + "self_attn.o_proj.weight"], arrays["wo"][i])
        np.testing.assert_array_equal(w[p + "mlp.gate_proj.weight"], arrays["w1"][i])
        np.testing.assert_array_equal(w[p + "mlp.down_proj.weight"], arrays["w2"][i])
        np.testing.assert_array_equal(w[p + "mlp.up_proj.weight"], arrays["w3"][i])
        np.testing.assert_array_equal(w[p + "input_layernorm.weight"], arrays["rms_att"][i])
        np.testing.assert_array_equal(w[p + "post_attention_layernorm.weight"], arrays["rms_ffn"][i])
    np.testing.assert_array_equal(w["norm.weight"], arrays["rms_final"])
    if shared:
        assert "lm_head.weight" not in w
    else:
        np.testing.assert_array_equal(w["lm_head.weight"], arrays["wcls"])
    spec = ckpt.tokenizer
    assert spec.kind == "llama2c" and spec.files == {"tokenizer.bin": tok_bytes}
    assert (spec.bos_token_id, spec.eos_token_ids, spec.add_bos) == (1, (2,), True)
    assert ckpt.source["format"] == "llama2c" and set(ckpt.source["files"]) == {"model.bin", "tok262.bin"}


def test_explicit_tokenizer_and_discovery_errors(tmp_path):
    write_checkpoint(tmp_path / "model.bin")
    with pytest.raises(BitsmithError, match="--tokenizer PATH") as info:
        load_llama2c(tmp_path / "model.bin")
    assert str(tmp_path) in str(info.value)
    write_tok(tmp_path / "tok_a.bin")
    write_tok(tmp_path / "tok_b.bin")
    with pytest.raises(BitsmithError, match="2 tokenizers"):
        load_llama2c(tmp_path / "model.bin")
    ckpt = load_llama2c(tmp_path / "model.bin", tokenizer_path=tmp_path / "tok_b.bin")
    assert "tok_b.bin" in ckpt.source["files"]


def test_tokenizer_vocab_mismatch(tmp_path):
    write_checkpoint(tmp_path / "model.bin")
    write_tok(tmp_path / "tok.bin", vocab=300)
    with pytest.raises(BitsmithError, match="300 tokens"):
        load_llama2c(tmp_path / "model.bin")


@pytest.mark.parametrize("cut", [10, 1000, -4])
def test_truncated(tmp_path, cut):
    write_checkpoint(tmp_path / "model.bin")
    write_tok(tmp_path / "tok.bin")
    path = tmp_path / "model.bin"
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(BitsmithError) as info:
        load_llama2c(path)
    assert str(path) in str(info.value)


def test_trailing_bytes(tmp_path):
    write_checkpoint(tmp_path / "model.bin")
    write_tok(tmp_path / "tok.bin")
    path = tmp_path / "model.bin"
    path.write_bytes(path.read_bytes() + b"\0" * 8)
    with pytest.raises(BitsmithError, match="trailing data"):
        load_llama2c(path)


@pytest.mark.parametrize("header", [
    (16, 24, 2, 4, 2, 262, 0),  # zero seq_len
    (16, 24, -2, 4, 2, 262, 8),  # negative layers
    (16, 24, 2, 5, 1, 262, 8),  # heads do not divide dim
    (16, 24, 2, 4, 3, 262, 8),  # kv heads do not divide heads
    (0x616B3432, 2, 2, 4, 2, 262, 8),  # a versioned (v1+) export
])
def test_nonsense_header(tmp_path, header):
    path = tmp_path / "model.bin"
    path.write_bytes(struct.pack("<7i", *header) + b"\0" * 64)
    write_tok(tmp_path / "tok.bin")
    with pytest.raises(BitsmithError) as info:
        load_llama2c(path)
    assert str(path) in str(info.value) and "version 0" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(BitsmithError, match="does not exist"):
        load_llama2c(tmp_path / "nope.bin")


def test_stories260k_matches_hf_conversion(shared_data: Path):
    from safetensors.numpy import load_file

    folder = shared_data / "stories260k"
    ckpt = load_llama2c(folder / "stories260K.bin")
    ref = {k.removeprefix("model."): v for k, v in load_file(folder / "hf" / "model.safetensors").items()}
    assert set(ref) == set(ckpt.weights)
    for name, value in ref.items():
        np.testing.assert_array_equal(ckpt.weights[name], value, err_msg=name)
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.vocab_size) == (64, 5, 8, 4, 512)
    assert cfg.tie_word_embeddings and cfg.max_position == 512
    assert ckpt.tokenizer.files["tokenizer.bin"] == (folder / "tok512.bin").read_bytes()
    assert ckpt.source["files"]["stories260K.bin"].startswith("b0a507e7")
