"""Hugging Face directory frontend: config.json + (sharded) safetensors + tokenizer for Llama-family models."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.config import ModelConfig, expected_weight_shapes
from bitsmith.compiler.frontends.base import (
    Checkpoint,
    LoadedModel,
    require_path,
    sha256_file,
)
from bitsmith.compiler.frontends.hf_files import (
    load_hf_tokenizer,
    read_json,
    rope_settings,
)
from bitsmith.compiler.frontends.hf_quantized import (
    drop_zero_biases,
    import_quantized,
    quantization_method,
)
from bitsmith.compiler.frontends.hf_quantized_traced import load_quantized_traced
from bitsmith.compiler.frontends.torch_export import load_hf_via_export
from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import StoredTensor, stored_tensors

# model_type -> how the architecture differs from plain Llama
HAND_WRITTEN = {
    "llama": {},
    "mistral": {},
    "qwen2": {"attention_bias": True},
    "qwen3": {"qk_norm": True},
}


def config_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """Translate an HF config.json dict of a hand-written family into a ModelConfig."""
    model_type = cfg.get("model_type")
    family = HAND_WRITTEN[model_type]
    heads = cfg["num_attention_heads"]
    theta, scaling = rope_settings(cfg)
    window = cfg.get("sliding_window")
    if model_type in ("qwen2", "qwen3") and not cfg.get("use_sliding_window", False):
        window = None
    layers = cfg["num_hidden_layers"]
    kinds = cfg.get("layer_types")  # transformers' per-layer "sliding_attention" / "full_attention"
    if window and not kinds and model_type in ("qwen2", "qwen3"):  # older configs: windowed from max_window_layers
        first = cfg.get("max_window_layers", layers)
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(layers)]
    layer_windows = tuple(window if kind == "sliding_attention" else None for kind in kinds) if window and kinds else ()
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
        layer_windows=layer_windows,
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


def read_safetensors(files: list[Path]) -> dict[str, StoredTensor]:
    """All tensors of the files (unread: each is read when a pass needs it), names without the "model." prefix."""
    weights: dict[str, StoredTensor] = {}
    for path in files:
        for key, array in stored_tensors(path).items():
            weights[key.removeprefix("model.")] = array
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


def load_hf(directory: str | Path) -> Checkpoint | LoadedModel:
    """Load a Llama/Mistral/Qwen2/Qwen3 HF directory; other architectures go through torch.export."""
    directory = require_path(directory, "model directory")
    if not directory.is_dir():
        raise BitsmithError(f"{directory} is not a directory", fix="pass a Hugging Face model directory")
    cfg = read_json(require_path(directory / "config.json", "config.json"))
    method = quantization_method(cfg, directory)
    if cfg.get("model_type") not in HAND_WRITTEN:
        if method:  # transformers alone would need the format's own (GPU) kernels: dequantize, trace, keep codes
            return load_quantized_traced(directory, cfg, _safetensors_files(directory), method)
        return load_hf_via_export(directory)
    config = config_from_hf(cfg)
    files = _safetensors_files(directory)
    weights = read_safetensors(files)
    where = str(directory)
    imported = import_quantized(cfg, weights, where) if method else None
    if imported and config.tie_word_embeddings and "lm_head.weight" in imported.weights:
        config = dataclasses.replace(config, tie_word_embeddings=False)  # its own (quantized) matrix now
        imported.notes.append("lm_head is quantized in the checkpoint: untied from the float embeddings")
    if imported:
        drop_zero_biases(weights, imported, set(expected_weight_shapes(config)))
    tie_embeddings(config, weights, where)
    for name in [k for k in weights if k.endswith("rotary_emb.inv_freq")]:
        weights.pop(name)
    ckpt = Checkpoint(
        config=config,
        weights=weights,
        tokenizer=load_hf_tokenizer(directory, config),
        source={"path": str(directory.resolve()), "format": "hf",
                "files": {p.name: sha256_file(p) for p in files + [directory / "config.json"]},
                **(imported.source_fields(method) if imported else {})},
        # the dequantized float32 matrices say nothing of the storage dtype: count the others (embeddings)
        dtype=storage_dtype({k: v for k, v in weights.items() if not imported or k not in imported.weights}),
        quantized=imported.quantized if imported else {},
        quantized_types=imported.exact_types() if imported else {},
    )
    ckpt.validate(where)
    return ckpt
