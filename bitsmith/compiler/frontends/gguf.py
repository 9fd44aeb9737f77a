"""GGUF checkpoints (architecture "llama") into canonical float32 weights, config and an HF tokenizer."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from bitsmith.compiler.config import ModelConfig
from bitsmith.compiler.frontends.base import Checkpoint, TokenizerSpec, require_path, sha256_file
from bitsmith.compiler.frontends.llama2c import interleaved_to_half
from bitsmith.errors import BitsmithError

# GGUF tensor name -> canonical name. GGUF shapes list the fastest dimension first ([in, out]), so a
# tensor is read as reversed(shape) = (out, in). llama.cpp's converter permuted attn_q/attn_k rows into
# interleaved RoPE pairs; `interleaved_to_half` undoes it (n_head = head_count for q, head_count_kv for k).
_GLOBAL_NAMES = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(.+)")
_UNPACKED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FIX_HF = "convert the model to a Hugging Face directory (config.json + safetensors) and compile that"
_FIX_FILE = "re-download the GGUF, or check that the path is a GGUF file"


def load_gguf(path: str | Path) -> Checkpoint:
    """Load a llama-architecture GGUF: dequantized float32 weights in HF layout, config, tokenizer.json."""
    path = require_path(path, "GGUF file")
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise BitsmithError(f"GGUF architecture {arch!r} is not supported (only 'llama')", where=str(path),
                            fix=_FIX_HF)
    config = _config(meta, reader, path)
    weights, types = _weights(reader, config, path)
    source = {
        "path": str(path),
        "format": "gguf",
        "files": {path.name: sha256_file(path)},
        "gguf_types": dict(sorted(types.items())),
    }
    checkpoint = Checkpoint(config=config, weights=weights, tokenizer=_tokenizer(path, meta), source=source,
                            dtype=_storage_dtype(reader))
    checkpoint.validate(str(path))
    return checkpoint


def _open_reader(path: Path) -> Any:
    """A GGUFReader over the file; a malformed or truncated file becomes a BitsmithError naming it."""
    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, KeyError, OverflowError, EOFError, OSError) as exc:
        raise BitsmithError(f"is not a valid GGUF file: {exc}", where=str(path), fix=_FIX_FILE) from exc
    for tensor in reader.tensors:
        if tensor.data.nbytes != tensor.n_bytes:
            raise BitsmithError(
                f"is not a valid GGUF file: tensor {tensor.name!r} has {tensor.data.nbytes} of {tensor.n_bytes} bytes "
                "(truncated?)", where=str(path), fix=_FIX_FILE)
    return reader


def _metadata(reader: Any, path: Path) -> dict[str, Any]:
    """Every key-value field as a Python value, except the large tokenizer arrays (read on demand)."""
    meta: dict[str, Any] = {}
    for key, field in reader.fields.items():
        if key in ("tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
            continue
        try:
            meta[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise BitsmithError(f"is not a valid GGUF file: field {key!r}: {exc}", where=str(path),
                                fix=_FIX_FILE) from exc
    return meta


def _required(meta: dict[str, Any], key: str, path: Path) -> Any:
    if key not in meta:
        raise BitsmithError(f"GGUF metadata lacks {key!r}", where=str(path), fix=_FIX_FILE)
    return meta[key]


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (1e-5, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _config(meta: dict[str, Any], reader: Any, path: Path) -> ModelConfig:
    """ModelConfig from llama.* metadata; vocab from the token list, tied when there is no output.weight."""
    hidden = int(_required(meta, "llama.embedding_length", path))
    n_heads = int(_required(meta, "llama.attention.head_count", path))
    head_dim = int(meta.get("llama.attention.key_length", hidden // n_heads))
    rope_dims = meta.get("llama.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise BitsmithError(f"partial rotary embedding (rope.dimension_count {rope_dims}, head_dim {head_dim})",
                            where=str(path), fix=_FIX_HF)
    names = {t.name for t in reader.tensors}
    tokens = meta.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens)
    elif "llama.vocab_size" in meta:
        vocab = int(meta["llama.vocab_size"])
    else:
        vocab = int(next(t.shape[-1] for t in reader.tensors if t.name == "token_embd.weight"))
    eos = meta.get("tokenizer.ggml.eos_token_id")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture="llama",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_required(meta, "llama.feed_forward_length", path)),
        num_layers=int(_required(meta, "llama.block_count", path)),
        num_heads=n_heads,
        num_kv_heads=int(meta.get("llama.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        rms_norm_eps=_f32(meta.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=_f32(meta.get("llama.rope.freq_base", 10000.0)),
        rope_style="half",
        rope_scaling=_rope_scaling(meta, path),
        max_position=int(meta.get("llama.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=None if bos is None else int(bos),
        eos_token_id=None if eos is None else int(eos),
    )


def _rope_scaling(meta: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """None or linear scaling; other schemes (yarn, llama3 rope_freqs) are not mapped yet."""
    kind = meta.get("llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": _f32(_required(meta, "llama.rope.scaling.factor", path))}
    raise BitsmithError(f"RoPE scaling {kind!r} is not supported for GGUF input", where=str(path), fix=_FIX_HF)


def _canonical_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _BLOCK.fullmatch(gguf_name)
    if match and match.group(2) in _BLOCK_NAMES:
        return f"layers.{match.group(1)}.{_BLOCK_NAMES[match.group(2)]}"
    fix = "llama3-style RoPE scaling is not supported yet; " + _FIX_HF if gguf_name == "rope_freqs.weight" else _FIX_HF
    raise BitsmithError(f"GGUF tensor {gguf_name!r} has no mapping to a llama weight", where=str(path), fix=fix)


def _weights(reader: Any, config: ModelConfig, path: Path) -> tuple[dict[str, np.ndarray], Counter]:
    """Dequantize every tensor to float32 (out, in); un-permute q/k rows. Also count the tensor types."""
    weights: dict[str, np.ndarray] = {}
    types: Counter = Counter()
    bar = tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False, disable=len(reader.tensors) < 64)
    for tensor in bar:
        name = _canonical_name(tensor.name, path)
        types[tensor.tensor_type.name] += 1
        shape = tuple(int(d) for d in reversed(tensor.shape))
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as exc:
            raise BitsmithError(f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): {exc}",
                                where=str(path), fix=_FIX_HF) from exc
        if name.endswith("self_attn.q_proj.weight"):
            w = interleaved_to_half(w, config.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            w = interleaved_to_half(w, config.num_kv_heads)
        weights[name] = np.array(w, dtype=np.float32)  # owned copy, not a view of the memory map
    return weights, types


def _storage_dtype(reader: Any) -> str:
    """The unpacked dtype every matrix is stored in; quantized (or mixed) files report float32."""
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    unpacked = matrix_types - {"F32"}
    if not unpacked:
        return "float32"
    if len(unpacked) == 1 and next(iter(unpacked)) in _UNPACKED_DTYPES:
        return _UNPACKED_DTYPES[next(iter(unpacked))]
    return "float32"


def _tokenizer(path: Path, meta: dict[str, Any]) -> TokenizerSpec | None:
    """The embedded tokenizer as tokenizer.json, via transformers' GGUF tokenizer conversion."""
    if "tokenizer.ggml.model" not in meta:
        return None
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer  # heavy: torch

    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError, IndexError) as exc:
        raise BitsmithError(f"cannot convert the GGUF tokenizer ({meta['tokenizer.ggml.model']!r}): {exc}",
                            where=str(path), fix=_FIX_HF) from exc
    eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return TokenizerSpec(
        kind="hf",
        files={"tokenizer.json": backend.to_str().encode("utf-8")},
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(dict.fromkeys(int(i) for i in eos_ids)),
        # llama.cpp adds BOS for a sentencepiece ("llama") vocabulary that does not say otherwise
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", meta["tokenizer.ggml.model"] == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
    )
