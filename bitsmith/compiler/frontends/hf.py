"""Hugging Face directory frontend: config.json + (sharded) safetensors + tokenizer for Llama-family models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.config import ModelConfig
from bitsmith.compiler.frontends.base import Checkpoint, LoadedModel, TokenizerSpec, require_path, sha256_file
from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import read_safetensors as read_safetensors_file

# model_type -> how the architecture differs from plain Llama
HAND_WRITTEN = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsmithError(f"cannot read JSON: {exc}", where=str(path), fix="is the file complete?") from exc


def _rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta", 10000.0))
    scaling = cfg.get("rope_scaling") or (params if params else None)
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "llama3"):
        raise BitsmithError(f"RoPE scaling {kind!r} is not supported", where="config.json",
                            fix="use a model with default, linear or llama3 RoPE scaling")
    scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
    return float(theta), scaling


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate an HF config.json dict of a hand-written family into a ModelConfig."""
    model_type = cfg.get("model_type")
    family = HAND_WRITTEN[model_type]
    heads = cfg["num_attention_heads"]
    theta, scaling = _rope_settings(cfg)
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    if cfg.get("attention_bias") and model_type != "qwen2":
        raise BitsmithError(f"{model_type} with attention_bias=true is not supported", where="config.json")
    return ModelConfig(
        architecture=model_type,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=cfg.get("max_position_embeddings", 2048),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        hidden_act=cfg.get("hidden_act", "silu"),
        sliding_window=window,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_id=cfg.get("eos_token_id"),
        **family,
    )


def _safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(read_json(index).get("weight_map", {}).values()))
        for shard in shards:
            require_path(directory / shard, "shard listed in model.safetensors.index.json")
        return [directory / s for s in shards]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise BitsmithError("no *.safetensors weights found", where=str(directory),
                            fix="convert the checkpoint to safetensors (e.g. save_pretrained(safe_serialization=True))")
    return files


def read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
    """All tensors of the files (memory-mapped), names without the "model." prefix."""
    weights: dict[str, np.ndarray] = {}
    for path in files:
        for key, array in read_safetensors_file(path).items():
            weights[key[len("model."):] if key.startswith("model.") else key] = array
    return weights


def tie_embeddings(config: ModelConfig, weights: dict[str, np.ndarray], where: str) -> None:
    """Tied checkpoints may store either matrix; keep exactly `embed_tokens.weight`."""
    if config.tie_word_embeddings:
        if "embed_tokens.weight" not in weights and "lm_head.weight" in weights:
            weights["embed_tokens.weight"] = weights["lm_head.weight"]
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        raise BitsmithError("lm_head.weight is missing and tie_word_embeddings is false", where=where,
                            fix="set tie_word_embeddings in config.json if the model shares its embeddings")


def storage_dtype(weights: dict[str, np.ndarray]) -> str:
    """The dtype most matrix parameters are stored in."""
    counts: dict[str, int] = {}
    for w in weights.values():
        if w.ndim == 2:
            counts[str(w.dtype)] = counts.get(str(w.dtype), 0) + w.size
    return max(counts, key=counts.get) if counts else "float32"


def load_hf_tokenizer(directory: Path, config: ModelConfig) -> TokenizerSpec | None:
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on malformed files
        raise BitsmithError(f"cannot load tokenizer: {exc}", where=str(path), fix="is the file complete?") from exc
    tcfg = read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").exists() else {}
    template = tcfg.get("chat_template")
    if (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()

    def token_id(key: str) -> int | None:
        tok_str = tcfg.get(key)
        tok_str = tok_str.get("content") if isinstance(tok_str, dict) else tok_str
        return tok.token_to_id(tok_str) if tok_str else None

    bos = config.bos_token_id if config.bos_token_id is not None else token_id("bos_token")
    eos = config.eos_ids or ([e] if (e := token_id("eos_token")) is not None else [])
    gen_cfg = directory / "generation_config.json"
    if gen_cfg.exists():
        g_eos = read_json(gen_cfg).get("eos_token_id")
        eos = sorted(set(eos) | set(g_eos if isinstance(g_eos, list) else [g_eos] if g_eos is not None else []))
    # Does the tokenizer's own post-processor prepend BOS? Then we must add it ourselves.
    with_special = tok.encode("a", add_special_tokens=True).ids
    add_bos = bos is not None and bool(with_special) and with_special[0] == bos
    files = {"tokenizer.json": path.read_bytes()}
    return TokenizerSpec("hf", files, bos, tuple(eos), add_bos, template)


def load_hf(directory: str | Path) -> "Checkpoint | LoadedModel":
    """Load a Llama/Mistral/Qwen2/Qwen3 HF directory; other architectures go through torch.export."""
    directory = require_path(directory, "model directory")
    if not directory.is_dir():
        raise BitsmithError(f"{directory} is not a directory", fix="pass a Hugging Face model directory")
    cfg = read_json(require_path(directory / "config.json", "config.json"))
    if cfg.get("model_type") not in HAND_WRITTEN:
        from bitsmith.compiler.frontends.torch_export import load_hf_via_export

        return load_hf_via_export(directory)
    config = config_from_hf(cfg)
    files = _safetensors_files(directory)
    weights = read_safetensors(files)
    where = str(directory)
    tie_embeddings(config, weights, where)
    for name in [k for k in weights if k.endswith("rotary_emb.inv_freq")]:
        weights.pop(name)
    ckpt = Checkpoint(
        config=config,
        weights=weights,
        tokenizer=load_hf_tokenizer(directory, config),
        source={"path": str(directory.resolve()), "format": "hf",
                "files": {p.name: sha256_file(p) for p in files + [directory / "config.json"]}},
        dtype=storage_dtype(weights),
    )
    ckpt.validate(where)
    return ckpt
