"""What every Hugging Face-style directory holds besides weights: JSON files, RoPE settings, the tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tokenizers import Tokenizer

from bitsmith.compiler.config import ModelConfig
from bitsmith.compiler.frontends.base import TokenizerSpec
from bitsmith.errors import BitsmithError


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BitsmithError(f"cannot read JSON: {exc}", where=str(path), fix="is the file complete?") from exc


def rope_settings(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope theta, scaling dict or None) from config.json; unsupported scaling kinds are refused."""
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


def load_hf_tokenizer(directory: Path, config: ModelConfig) -> TokenizerSpec | None:
    path = directory / "tokenizer.json"
    if not path.exists():
        return None
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


def max_positions(cfg: dict) -> int:
    """The model's context length: max_position_embeddings, or GPT-2's n_positions (its learned position table)."""
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)


def hf_side_files(directory: Path, cfg: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """(tokenizer spec or None, config with `max_position`) from an HF-style directory. Shared with ONNX."""
    eos = cfg.get("eos_token_id")
    ids = SimpleNamespace(bos_token_id=cfg.get("bos_token_id"),  # what load_hf_tokenizer reads of a ModelConfig
                          eos_ids=list(eos) if isinstance(eos, list) else ([eos] if eos is not None else []))
    config = {**cfg, "architecture": cfg.get("model_type"), "max_position": max_positions(cfg)}
    return load_hf_tokenizer(directory, ids), config
