"""The tokenizer a GGUF file embeds (tokenizer.ggml.*), as a tokenizer.json TokenizerSpec with its chat template."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bitsmith.compiler.frontends.base import TokenizerSpec
from bitsmith.compiler.frontends.gguf_arch import FIX_HF
from bitsmith.errors import BitsmithError


def gguf_tokenizer(path: Path, meta: dict[str, Any]) -> TokenizerSpec | None:
    """The embedded tokenizer as tokenizer.json, via transformers' GGUF tokenizer conversion (per architecture:
    sentencepiece "llama" vocabularies of Gemma and Phi-3 differ in how they prefix spaces)."""
    if meta.get("tokenizer.ggml.model", "none") in ("none", "no_vocab"):  # llama.cpp's vocabulary-less models
        return None
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer  # heavy: torch

    try:
        architecture, tokenizer_dict, _ = get_gguf_tokenizer(str(path))
        backend, _ = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (ValueError, KeyError, IndexError) as exc:
        raise BitsmithError(f"cannot convert the GGUF tokenizer ({meta['tokenizer.ggml.model']!r}): {exc}",
                            where=str(path), fix=FIX_HF) from exc
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
