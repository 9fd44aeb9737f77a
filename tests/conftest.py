"""Shared fixtures: tiny random HF models of every family and the location of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BITSMITH_DATA", REPO_ROOT.parent / "shared" / "data"))

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real models and text not found at {SHARED_DATA} (set BITSMITH_DATA)")
    return SHARED_DATA


def tiny_hf_config(family: str, tie: bool = False):
    """A small random config of `family` (GQA, 2 layers) built from transformers' own config classes."""
    import transformers

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    extra = {"head_dim": 16} if family in ("llama", "qwen3") else {}
    if family == "mistral":
        extra["sliding_window"] = None
    cfg = cls(**common, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def make_tiny_hf_model(family: str, tie: bool = False, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, tie), dtype=torch.float32)
    model.eval()
    return model


def save_tiny_hf_model(directory: Path, family: str, tie: bool = False, seed: int = 0):
    model = make_tiny_hf_model(family, tie, seed)
    model.save_pretrained(directory)
    return model


@pytest.fixture(params=FAMILIES)
def tiny_hf_dir(request, tmp_path):
    """(family, directory, torch model) for a tiny random model saved in HF layout."""
    directory = tmp_path / request.param
    model = save_tiny_hf_model(directory, request.param)
    return request.param, directory, model
