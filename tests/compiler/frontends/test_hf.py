"""HF frontend: every hand-written family matches transformers fp32 (prefill + 8 decode steps)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from bitsmith.compiler.frontends.base import checkpoint_to_model
from bitsmith.compiler.frontends.hf import load_hf
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from conftest import save_tiny_hf_model

RTOL = 1e-4


def transformers_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids[None])).logits[0].numpy()


def prefill_then_decode(session: ReferenceSession, ids: np.ndarray, n_prefill: int) -> np.ndarray:
    """Teacher-forced: logits of prefill(ids[:n]) followed by decode of each remaining token."""
    rows = [session.prefill([int(t) for t in ids[:n_prefill]])]
    rows += [session.decode(int(t))[None] for t in ids[n_prefill:]]
    return np.concatenate(rows)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_family_matches_transformers(tiny_hf_dir):
    family, directory, model = tiny_hf_dir
    loaded = checkpoint_to_model(load_hf(directory))
    verify_module(loaded.module)
    assert loaded.config["architecture"] == family
    ids = np.random.default_rng(1).integers(3, 96, size=13)
    ours = prefill_then_decode(ReferenceSession(loaded.module, loaded.weights, 32), ids, 5)  # prefill 5, decode 8
    assert relative_error(ours, transformers_logits(model, ids)) < RTOL


@pytest.mark.parametrize("stored", ["lm_head", "embed_tokens"])
def test_tied_embeddings_stored_either_way(tmp_path, stored):
    model = save_tiny_hf_model(tmp_path, "llama", tie=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    drop = "model.embed_tokens.weight" if stored == "lm_head" else "lm_head.weight"
    state.pop(drop, None)
    keep = "lm_head.weight" if stored == "lm_head" else "model.embed_tokens.weight"
    state[keep] = model.get_input_embeddings().weight.detach().clone()
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = checkpoint_to_model(load_hf(tmp_path))
    assert "lm_head.weight" not in loaded.weights
    ids = np.arange(3, 12)
    ours = ReferenceSession(loaded.module, loaded.weights, 16).prefill(list(ids))
    assert relative_error(ours, transformers_logits(model, ids)) < RTOL


def test_sharded_checkpoint(tmp_path):
    model = save_tiny_hf_model(tmp_path, "qwen3")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = checkpoint_to_model(load_hf(tmp_path))
    ids = np.arange(3, 10)
    ours = ReferenceSession(loaded.module, loaded.weights, 16).prefill(list(ids))
    assert relative_error(ours, transformers_logits(model, ids)) < RTOL


def test_truncated_safetensors_is_named(tmp_path):
    save_tiny_hf_model(tmp_path, "llama")
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BitsmithError, match=r"model.safetensors.*truncated"):
        load_hf(tmp_path)


def test_missing_weight_is_named(tmp_path):
    model = save_tiny_hf_model(tmp_path, "llama")
    state = {k: v.contiguous() for k, v in model.state_dict().items() if "layers.1.mlp.up_proj" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(BitsmithError, match=r"layers.1.mlp.up_proj.weight' is missing"):
        load_hf(tmp_path)
