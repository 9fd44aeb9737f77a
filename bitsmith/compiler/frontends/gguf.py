"""GGUF files of the architectures in gguf_arch.GGUF_ARCHS into float32 weights, IR and a tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from bitsmith.compiler.frontends.base import Checkpoint, LoadedModel, require_path, sha256_file
from bitsmith.compiler.frontends.gguf_arch import (FIX_HF, arch_key, hf_config, hf_name, llama3_rope_scaling,
                                                   undo_conversion)
from bitsmith.compiler.frontends.gguf_tokenizer import gguf_tokenizer
from bitsmith.compiler.frontends.hf import HAND_WRITTEN, config_from_hf, tie_embeddings
from bitsmith.compiler.frontends.hf_files import rope_settings
from bitsmith.compiler.frontends.torch_export import trace_module
from bitsmith.errors import BitsmithError

_UNPACKED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FIX_FILE = "re-download the GGUF, or check that the path is a GGUF file"


def load_gguf(path: str | Path) -> Checkpoint | LoadedModel:
    """Load a GGUF: llama, qwen2 and qwen3 become a Checkpoint of the hand-written IR; the other architectures are
    mapped back to their transformers model (config + dequantized state dict) and traced through torch.export."""
    path = require_path(path, "GGUF file")
    reader, meta, cfg, state, types = _read(path)
    source = {"path": str(path), "format": "gguf", "files": {path.name: sha256_file(path)},
              "gguf_architecture": meta["general.architecture"], "gguf_types": dict(sorted(types.items()))}
    tokenizer, dtype = gguf_tokenizer(path, meta), _storage_dtype(reader)
    if cfg["model_type"] not in HAND_WRITTEN:
        return _traced(cfg, state, tokenizer, source, dtype, path)
    config = config_from_hf(cfg)
    weights = {name.removeprefix("model."): w for name, w in state.items()}
    tie_embeddings(config, weights, str(path))
    checkpoint = Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source, dtype=dtype)
    checkpoint.validate(str(path))
    return checkpoint


def gguf_hf_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, HF state dict in float32) of a GGUF: the checkpoint llama.cpp's converter started from."""
    _, _, cfg, state, _ = _read(require_path(path, "GGUF file"))
    return cfg, state


def _read(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, np.ndarray], Counter]:
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    key = arch_key(meta, path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    cfg = hf_config(key, meta, shapes, path)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # llama3 RoPE scaling, stored as its per-frequency divisors
        cfg["rope_scaling"] = llama3_rope_scaling(np.asarray(freqs.data), cfg.get("rope_theta", 10000.0),
                                                  cfg["head_dim"], path)
    state, types = _state_dict(reader, key, cfg, path)
    return reader, meta, cfg, state, types


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


def _state_dict(reader: Any, key: str, cfg: dict[str, Any], path: Path) -> tuple[dict[str, np.ndarray], Counter]:
    """Every tensor dequantized to float32 under its HF name, the converter's changes undone; and the type counts."""
    state: dict[str, np.ndarray] = {}
    halves: dict[str, list] = {}  # fused gate_up_proj of experts: [gate, up]
    types: Counter = Counter()
    bar = tqdm(reader.tensors, desc="dequantizing GGUF", unit="tensor", leave=False, disable=len(reader.tensors) < 64)
    for tensor in bar:
        if tensor.name == "rope_freqs.weight":  # read into cfg["rope_scaling"]
            continue
        name, half = hf_name(key, tensor.name, path)
        types[tensor.tensor_type.name] += 1
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists the fastest dimension first
        try:
            w = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        except (NotImplementedError, ValueError) as exc:
            raise BitsmithError(f"cannot dequantize tensor {tensor.name!r} ({tensor.tensor_type.name}): {exc}",
                                where=str(path), fix=FIX_HF) from exc
        w = np.array(undo_conversion(key, tensor.name, w, cfg), dtype=np.float32)  # owned, not the memory map
        if half is None:
            state[name] = w
        else:
            halves.setdefault(name, [None, None])[half] = w
    for name, (gate, up) in halves.items():
        if gate is None or up is None:
            raise BitsmithError(f"GGUF has only one of the expert gate/up tensors for {name!r}", where=str(path),
                                fix=_FIX_FILE)
        state[name] = np.concatenate([gate, up], axis=1)  # [n_expert, 2 * ff, hidden], gate first
    return state, types


def _traced(cfg: dict[str, Any], state: dict[str, np.ndarray], tokenizer: Any, source: dict[str, Any], dtype: str,
            path: Path) -> LoadedModel:
    """Build the transformers model of `cfg` around `state` and trace it (architectures without a hand-written IR)."""
    import torch  # heavy: torch
    import transformers  # heavy: torch
    from transformers.initialization import no_init_weights  # heavy: torch

    model_type = cfg["model_type"]
    config = transformers.AutoConfig.for_model(**cfg)
    with no_init_weights():  # parameters left unset (replaced below); buffers such as RoPE frequencies are built
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise BitsmithError(f"GGUF tensors do not match a {model_type} model: missing {missing[:4]}, "
                            f"unexpected {unexpected[:4]}", where=str(path), fix=FIX_HF)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    rope = [{"theta": theta, "scaling": scaling} for theta, scaling in _rope_kinds(cfg) if scaling]
    module, weights = trace_module(model, torch.arange(2, 10), rope, meta={"architecture": model_type})
    config_json = {**cfg, "architecture": model_type, "max_position": cfg.get("max_position_embeddings", 2048)}
    return LoadedModel(module, weights, tokenizer, config_json, source, dtype)


def _rope_kinds(cfg: dict[str, Any]) -> list[tuple[float, dict[str, Any] | None]]:
    """(theta, scaling) of each RoPE in the config: one, or one per layer kind (Gemma 3's rope_parameters)."""
    params = cfg.get("rope_parameters")
    if isinstance(params, dict) and params and all(isinstance(p, dict) for p in params.values()):
        configs = [{"rope_parameters": p} for p in params.values()]
    else:
        configs = [cfg]
    kinds = []
    for config in configs:
        try:
            kinds.append(rope_settings(config))
        except BitsmithError:  # a RoPE kind the IR op lacks: left unfused (still correct)
            continue
    return kinds


def _storage_dtype(reader: Any) -> str:
    """The unpacked dtype every matrix is stored in; quantized (or mixed) files report float32."""
    matrix_types = {t.tensor_type.name for t in reader.tensors if len(t.shape) >= 2}
    unpacked = matrix_types - {"F32"}
    if not unpacked:
        return "float32"
    if len(unpacked) == 1 and next(iter(unpacked)) in _UNPACKED_DTYPES:
        return _UNPACKED_DTYPES[next(iter(unpacked))]
    return "float32"
