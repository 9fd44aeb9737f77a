"""llama2.c checkpoints (legacy version-0 export) into canonical weights with HF rotate_half q/k rows."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from bitsmith.compiler.config import ModelConfig
from bitsmith.compiler.frontends.base import Checkpoint, TokenizerSpec, require_path, sha256_file
from bitsmith.errors import BitsmithError
from bitsmith.runtime.tokenizer_llama2c import parse_tokenizer_bin

# Legacy v0 layout: 7 little-endian int32 `dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size,
# seq_len` (vocab_size < 0: the classifier is not shared), then float32 arrays, matrices (out, in) row-major:
#   token_embedding[vocab, dim]  rms_att[L, dim]  wq[L, dim, dim]  wk[L, kv_dim, dim]  wv[L, kv_dim, dim]
#   wo[L, dim, dim]  rms_ffn[L, dim]  w1[L, hidden, dim]  w2[L, dim, hidden]  w3[L, hidden, dim]
#   rms_final[dim]  freq_cis_real[seq_len, head_dim/2]  freq_cis_imag[seq_len, head_dim/2]  (wcls[vocab, dim])
_HEADER = struct.Struct("<7i")
_V1_MAGIC = 0x616B3432  # "ak42": llama2.c's newer versioned exports
_MAX_DIM = 1 << 20
_FIX_EXPORT = "re-export with llama2.c `export.py --version 0` (legacy format), or re-download the file"


def interleaved_to_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows from interleaved RoPE pairs (2i, 2i+1) to HF rotate_half pairs (i, i + d/2), per head."""
    out, inp = w.shape
    return np.ascontiguousarray(w.reshape(n_heads, out // n_heads // 2, 2, inp).swapaxes(1, 2).reshape(out, inp))


def load_llama2c(path: str | Path, tokenizer_path: str | Path | None = None) -> Checkpoint:
    """Load a llama2.c `.bin` and its `tok*.bin` into a Checkpoint with rope_style "half"."""
    path = require_path(path, "llama2.c checkpoint")
    data = path.read_bytes()
    header = _read_header(data, path)
    config = _config_from_header(header)
    weights = _read_weights(data, header, config, path)
    tok_path = _find_tokenizer(path, tokenizer_path)
    tokenizer = _tokenizer_spec(tok_path, config.vocab_size)
    source = {
        "path": str(path),
        "format": "llama2c",
        "files": {path.name: sha256_file(path), tok_path.name: sha256_file(tok_path)},
    }
    checkpoint = Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source, dtype="float32")
    checkpoint.validate(str(path))
    return checkpoint


def _read_header(data: bytes, path: Path) -> tuple[int, ...]:
    """The 7 header ints, checked for sense (positive dims, heads dividing dims, even head_dim)."""
    if len(data) < _HEADER.size:
        raise BitsmithError(f"is not a llama2.c checkpoint: {len(data)} bytes, shorter than the 28-byte header",
                            where=str(path), fix=_FIX_EXPORT)
    header = _HEADER.unpack_from(data, 0)
    if header[0] == _V1_MAGIC:
        raise BitsmithError("is a versioned llama2.c export (magic 'ak42'); only the legacy version 0 is supported",
                            where=str(path), fix=_FIX_EXPORT)
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    problem = None
    if not all(0 < v < _MAX_DIM for v in (dim, hidden, n_layers, n_heads, n_kv_heads, abs(vocab), seq_len)):
        problem = "a header value is zero, negative or implausibly large"
    elif dim % n_heads or (dim // n_heads) % 2:
        problem = f"dim {dim} is not n_heads {n_heads} times an even head_dim"
    elif n_heads % n_kv_heads:
        problem = f"n_heads {n_heads} is not a multiple of n_kv_heads {n_kv_heads}"
    if problem:
        raise BitsmithError(f"is not a llama2.c checkpoint: {problem} (header {list(header)})",
                            where=str(path), fix=_FIX_EXPORT)
    return header


def _config_from_header(header: tuple[int, ...]) -> ModelConfig:
    dim, hidden, n_layers, n_heads, n_kv_heads, vocab, seq_len = header
    return ModelConfig(
        architecture="llama",
        vocab_size=abs(vocab),
        hidden_size=dim,
        intermediate_size=hidden,
        num_layers=n_layers,
        num_heads=n_heads,
        num_kv_heads=n_kv_heads,
        head_dim=dim // n_heads,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_style="half",
        max_position=seq_len,
        tie_word_embeddings=vocab > 0,
        bos_token_id=1,
        eos_token_id=2,
    )


def _array_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every float32 array in file order; see the layout comment at the top."""
    d, h, n_layers, v = config.hidden_size, config.intermediate_size, config.num_layers, config.vocab_size
    kv = config.num_kv_heads * config.head_dim
    half = config.head_dim // 2
    shapes = [
        ("token_embedding", (v, d)), ("rms_att", (n_layers, d)), ("wq", (n_layers, d, d)),
        ("wk", (n_layers, kv, d)), ("wv", (n_layers, kv, d)), ("wo", (n_layers, d, d)),
        ("rms_ffn", (n_layers, d)), ("w1", (n_layers, h, d)), ("w2", (n_layers, d, h)),
        ("w3", (n_layers, h, d)), ("rms_final", (d,)), ("freq_cis_real", (config.max_position, half)),
        ("freq_cis_imag", (config.max_position, half)),
    ]
    if not config.tie_word_embeddings:
        shapes.append(("wcls", (v, d)))
    return shapes


def _read_weights(data: bytes, header: tuple[int, ...], config: ModelConfig, path: Path) -> dict[str, np.ndarray]:
    """Slice the float32 body into the named arrays and map them onto canonical names."""
    shapes = _array_shapes(config)
    expected = _HEADER.size + 4 * sum(int(np.prod(s)) for _, s in shapes)
    if len(data) != expected:
        raise BitsmithError(
            f"size {len(data)} bytes does not match the header {list(header)}, which implies {expected} bytes "
            f"({'truncated' if len(data) < expected else 'trailing data'})",
            where=str(path), fix=_FIX_EXPORT,
        )
    body = np.frombuffer(data, dtype="<f4", offset=_HEADER.size)
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in shapes:
        count = int(np.prod(shape))
        arrays[name] = body[offset : offset + count].reshape(shape)
        offset += count
    return _canonical(arrays, config)


def _canonical(a: dict[str, np.ndarray], config: ModelConfig) -> dict[str, np.ndarray]:
    """Canonical names (config.py); q/k rows permuted to rotate_half, every array an owned float32 copy."""
    weights = {"embed_tokens.weight": a["token_embedding"]}
    for i in range(config.num_layers):
        p = f"layers.{i}."
        weights[p + "input_layernorm.weight"] = a["rms_att"][i]
        weights[p + "self_attn.q_proj.weight"] = interleaved_to_half(a["wq"][i], config.num_heads)
        weights[p + "self_attn.k_proj.weight"] = interleaved_to_half(a["wk"][i], config.num_kv_heads)
        weights[p + "self_attn.v_proj.weight"] = a["wv"][i]
        weights[p + "self_attn.o_proj.weight"] = a["wo"][i]
        weights[p + "post_attention_layernorm.weight"] = a["rms_ffn"][i]
        weights[p + "mlp.gate_proj.weight"] = a["w1"][i]
        weights[p + "mlp.down_proj.weight"] = a["w2"][i]
        weights[p + "mlp.up_proj.weight"] = a["w3"][i]
    weights["norm.weight"] = a["rms_final"]
    if "wcls" in a:
        weights["lm_head.weight"] = a["wcls"]
    return {name: np.array(w, dtype=np.float32) for name, w in weights.items()}


def _find_tokenizer(path: Path, tokenizer_path: str | Path | None) -> Path:
    """`tokenizer_path` if given, else the one `tok*.bin` beside the checkpoint."""
    if tokenizer_path is not None:
        return require_path(tokenizer_path, "llama2.c tokenizer")
    found = sorted(p for p in path.parent.glob("tok*.bin") if p.is_file() and p.resolve() != path.resolve())
    if len(found) != 1:
        what = "no tok*.bin" if not found else f"{len(found)} tokenizers ({', '.join(p.name for p in found)})"
        raise BitsmithError(f"found {what} beside the llama2.c checkpoint", where=str(path.parent),
                            fix="pass --tokenizer PATH to the llama2.c tok*.bin to use")
    return found[0]


def _tokenizer_spec(tok_path: Path, vocab_size: int) -> TokenizerSpec:
    """The tokenizer bytes, checked to parse and to hold exactly `vocab_size` pieces."""
    data = tok_path.read_bytes()
    pieces, _ = parse_tokenizer_bin(data, str(tok_path))
    if len(pieces) != vocab_size:
        raise BitsmithError(f"tokenizer holds {len(pieces)} tokens, the checkpoint's vocab_size is {vocab_size}",
                            where=str(tok_path), fix="pass --tokenizer PATH to the tok*.bin this model was trained with")
    return TokenizerSpec(kind="llama2c", files={"tokenizer.bin": data}, bos_token_id=1, eos_token_ids=(2,),
                         add_bos=True)
