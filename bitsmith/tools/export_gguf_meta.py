"""GGUF metadata of an exported artifact: the hyper-parameters llama.cpp reads, and tokenizer.ggml.* from tokenizer.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFWriter, RopeScalingType, TokenType

from bitsmith.errors import BitsmithError

# artifact architecture -> (GGUF general.architecture, the q/k row order llama.cpp's RoPE expects for it):
# llama.cpp's "llama" rotates interleaved pairs (2i, 2i+1), so its converter permutes HF's q/k rows; qwen2/qwen3
# rotate NEOX-style halves (i, i + d/2), HF's own order.
GGUF_ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "interleaved"),
    "mistral": ("llama", "interleaved"),  # llama.cpp's converter writes Mistral as llama
    "qwen2": ("qwen2", "half"),
    "qwen3": ("qwen3", "half"),
}
# tokenizer.json pre-tokenizer (byte-level BPE) -> llama.cpp's tokenizer.ggml.pre naming the same split
_LLAMA3_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                 "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_QWEN2_SPLIT = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|"
                "\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
FIX_ARCH = "export an artifact of a llama, mistral, qwen2 or qwen3 model (or use --format compressed-tensors)"


def gguf_architecture(config: dict[str, Any], where: str) -> tuple[str, str]:
    """(GGUF architecture, q/k row order it expects) for the artifact's model config; others refused by name."""
    arch = config.get("architecture")
    if arch not in GGUF_ARCHITECTURES or "rope_style" not in config:
        raise BitsmithError(f"architecture {arch!r} has no GGUF export (supported: {', '.join(GGUF_ARCHITECTURES)})",
                            where=where, fix=FIX_ARCH)
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {config['hidden_act']!r} (llama.cpp's {arch} uses silu)")
    if config.get("sliding_window") or any(config.get("layer_windows") or ()):
        problems.append(f"sliding-window attention ({config.get('sliding_window')})")
    scaling = config.get("rope_scaling")
    if scaling and scaling.get("rope_type", scaling.get("type")) != "linear":
        problems.append(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} (only linear is written)")
    if arch in ("llama", "mistral") and (config.get("attention_bias") or config.get("qk_norm")):
        problems.append("q/k/v biases or q/k norms in a llama-architecture model")
    if problems:
        raise BitsmithError(f"the model's {'; '.join(problems)} has no GGUF {arch} form", where=where, fix=FIX_ARCH)
    return GGUF_ARCHITECTURES[arch]


def add_hparams(writer: GGUFWriter, config: dict[str, Any], name: str) -> None:
    """general.* and the {arch}.* keys llama.cpp's loader reads for a llama-family model."""
    writer.add_type("model")
    writer.add_name(name)
    writer.add_context_length(int(config["max_position"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_heads"]))
    writer.add_head_count_kv(int(config["num_kv_heads"]))
    writer.add_key_length(int(config["head_dim"]))
    writer.add_value_length(int(config["head_dim"]))
    writer.add_rope_dimension_count(int(config["head_dim"]))
    writer.add_rope_freq_base(float(config["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    scaling = config.get("rope_scaling")
    if scaling:  # linear (gguf_architecture refused the others)
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))


def _pre(tokenizer: dict[str, Any]) -> str | None:
    """llama.cpp's pre-tokenizer name for a byte-level BPE tokenizer.json, or None when none matches."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # GPT-2's split after single digits
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}.get(regex)
    return None


def _merges(model: dict[str, Any]) -> list[str]:
    """BPE merges as "a b" strings (tokenizer.json writes them as strings or, newer, as pairs)."""
    return [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]


def add_tokenizer(writer: GGUFWriter, directory: Path, entry: dict[str, Any] | None, vocab_size: int) -> list[str]:
    """tokenizer.ggml.* from the artifact's tokenizer.json and its manifest entry; returns notes for the report."""
    if not entry:
        writer.add_tokenizer_model("none")  # llama.cpp's vocabulary-less models: token ids in, token ids out
        return ["the artifact has no tokenizer: the GGUF has none (llama.cpp then takes token ids)"]
    path = directory / "tokenizer.json"
    if entry.get("kind") != "hf" or not path.is_file():
        raise BitsmithError(f"tokenizer kind {entry.get('kind')!r} has no GGUF form (a tokenizer.json is needed)",
                            where=str(directory), fix="compile from an HF directory or a GGUF with a tokenizer")
    tok = json.loads(path.read_text(encoding="utf-8"))
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise BitsmithError(f"tokenizer model {model.get('type')!r} has no GGUF export yet (BPE only)",
                            where=str(path), fix="export --format compressed-tensors (it keeps tokenizer.json)")
    byte_level = "ByteLevel" in json.dumps([tok.get("pre_tokenizer"), tok.get("decoder")])
    if not byte_level and not model.get("byte_fallback"):
        raise BitsmithError("a BPE tokenizer that is neither byte-level nor byte-fallback has no GGUF form",
                            where=str(path), fix="export --format compressed-tensors (it keeps tokenizer.json)")
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    by_id = {i: s for s, i in model["vocab"].items()} | {i: t["content"] for i, t in added.items()}
    n = max(vocab_size, max(by_id) + 1)
    tokens, types = [], []
    for i in range(n):  # ids the tokenizer lacks up to the embedding's rows are padding, as the converter writes
        text = by_id.get(i)
        tokens.append(text if text is not None else f"[PAD{i}]")
        if text is None:
            types.append(TokenType.UNUSED)
        elif i in added:
            types.append(TokenType.CONTROL if added[i].get("special") else TokenType.USER_DEFINED)
        elif not byte_level and text.startswith("<0x") and len(text) == 6:
            types.append(TokenType.BYTE)
        else:
            types.append(TokenType.NORMAL)
    notes = []
    if byte_level:
        writer.add_tokenizer_model("gpt2")
        pre = _pre(tok)
        if pre is None:
            notes.append("the tokenizer.json pre-tokenizer matches no llama.cpp pre-tokenizer: wrote 'default' "
                         "(llama.cpp may split text differently; token ids are unaffected)")
        writer.add_tokenizer_pre(pre or "default")
    else:  # sentencepiece-style BPE (byte fallback): llama.cpp merges by score, highest first, i.e. merge order
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        rank = {m.replace(" ", ""): r for r, m in enumerate(_merges(model))}
        writer.add_token_scores([-float(rank.get(t, 0)) for t in tokens])
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if byte_level:
        writer.add_token_merges(_merges(model))
    if entry.get("bos_token_id") is not None:
        writer.add_bos_token_id(int(entry["bos_token_id"]))
    eos = list(entry.get("eos_token_ids") or [])
    if eos:
        writer.add_eos_token_id(int(eos[0]))
    if len(eos) > 1:
        writer.add_eot_token_id(int(eos[1]))
    writer.add_add_bos_token(bool(entry.get("add_bos")))
    if entry.get("chat_template"):
        writer.add_chat_template(entry["chat_template"])
    return notes
