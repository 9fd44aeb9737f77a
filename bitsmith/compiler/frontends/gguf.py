"""GGUF files of the architectures in gguf_arch.GGUF_ARCHS into float32 weights, IR and a tokenizer."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from tqdm import tqdm

from bitsmith.compiler.analysis import weight_uses
from bitsmith.compiler.frontends.base import Checkpoint, LoadedModel, require_path, sha256_file
from bitsmith.compiler.frontends.gguf_arch import (FIX_HF, NEAREST_EXACT, arch_key, hf_config, hf_name,
                                                   llama3_rope_scaling, undo_conversion, undo_conversion_codes)
from bitsmith.compiler.frontends.gguf_tokenizer import gguf_tokenizer
from bitsmith.compiler.frontends.graph_lowering import weight_name
from bitsmith.compiler.frontends.hf import HAND_WRITTEN, config_from_hf, tie_embeddings
from bitsmith.compiler.frontends.hf_files import rope_settings
from bitsmith.compiler.frontends.torch_export import trace_module
from bitsmith.compiler.gguf_blocks import GGUF_SCHEMES, decode
from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight

_UNPACKED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_FIX_FILE = "re-download the GGUF, or check that the path is a GGUF file"
EMBED, LM_HEAD = "embed_tokens.weight", "lm_head.weight"
Codes = dict[str, tuple[QuantizedWeight, str]]  # HF weight name -> (exact codes, ggml type name)


def load_gguf(path: str | Path) -> Checkpoint | LoadedModel:
    """Load a GGUF: llama, qwen2 and qwen3 become a Checkpoint of the hand-written IR; the other architectures are
    mapped back to their transformers model (config + dequantized state dict) and traced through torch.export.

    Matrices whose ggml type maps onto a scheme exactly (gguf_blocks.GGUF_SCHEMES) also come as their codes
    (`quantized`, imported as they are) next to their dequantized float32 values; source["notes"] says what did not.
    """
    path = require_path(path, "GGUF file")
    reader, meta, cfg, state, types, codes, notes, kinds = _read(path)
    source = {"path": str(path), "format": "gguf", "files": {path.name: sha256_file(path)},
              "gguf_architecture": meta["general.architecture"], "gguf_types": dict(sorted(types.items()))}
    tokenizer, dtype = gguf_tokenizer(path, meta), _storage_dtype(reader)
    if cfg["model_type"] not in HAND_WRITTEN:
        loaded = _traced(cfg, state, tokenizer, source, dtype, path)
        _attach(loaded, _traced_exact(loaded.module, codes), kinds, codes, notes)
        return loaded
    config = config_from_hf(cfg)
    weights = {name.removeprefix("model."): w for name, w in state.items()}
    tie_embeddings(config, weights, str(path))
    checkpoint = Checkpoint(config=config, weights=weights, tokenizer=tokenizer, source=source, dtype=dtype)
    checkpoint.validate(str(path))
    exact = {name.removeprefix("model."): name for name in codes if name != "model." + EMBED}
    if config.tie_word_embeddings and "model." + EMBED in codes:  # the tied lm_head reads the embedding's codes
        exact[LM_HEAD] = "model." + EMBED
    _attach(checkpoint, exact, kinds, codes, notes)
    return checkpoint


def gguf_hf_checkpoint(path: str | Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """(HF config dict, HF state dict in float32) of a GGUF: the checkpoint llama.cpp's converter started from."""
    _, _, cfg, state, *_ = _read(require_path(path, "GGUF file"))
    return cfg, state


def _attach(model: Checkpoint | LoadedModel, exact: dict[str, str], kinds: dict[str, str], codes: Codes,
            notes: list[str]) -> None:
    """Give `model` the codes of `exact` (IR weight name -> HF name), the ggml type of every matrix (`kinds`: HF
    name -> type; source["weight_types"], what `inspect` lists as exact or converted) and the notes.

    The embedding table stays float32 (exactly the GGUF's values): the lookup reads dense tables or bitsmith's own
    sym/asym packing, and no plan quantizes an embedding; a tied lm_head gets the codes as `lm_head.weight`.
    """
    model.quantized = {ir: codes[hf][0] for ir, hf in exact.items()}
    model.quantized_types = {ir: codes[hf][1] for ir, hf in exact.items()}
    if "model." + EMBED in codes:
        kind = codes["model." + EMBED][1]
        tied = "lm_head.weight" not in kinds
        head = ("; the tied lm_head uses its codes" if exact.get(LM_HEAD) == "model." + EMBED else
                "; the tied lm_head (one traced weight with the embedding) stays float too" if tied else "")
        notes.append(f"embed_tokens.weight ({kind}) kept as float32 (its exact GGUF values) for the embedding lookup"
                     + head)
    for hf in sorted(set(codes) - set(exact.values()) - {"model." + EMBED}):
        notes.append(f"{hf.removeprefix('model.')} ({codes[hf][1]}) kept as float32: it is not read as the matrix of "
                     "a linear in the traced graph, so its codes cannot be imported")
    model.source["weight_types"] = {name.removeprefix("model."): kind for name, kind in sorted(kinds.items())}
    model.source["notes"] = notes


def _read(path: Path) -> tuple[Any, dict[str, Any], dict[str, Any], dict[str, np.ndarray], Counter, Codes, list[str],
                              dict[str, str]]:
    reader = _open_reader(path)
    meta = _metadata(reader, path)
    key = arch_key(meta, path)
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    cfg = hf_config(key, meta, shapes, path)
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:  # llama3 RoPE scaling, stored as its per-frequency divisors
        cfg["rope_scaling"] = llama3_rope_scaling(np.asarray(freqs.data), cfg.get("rope_theta", 10000.0),
                                                  cfg["head_dim"], path)
    state, types, codes, notes, kinds = _state_dict(reader, key, cfg, path)
    return reader, meta, cfg, state, types, codes, notes, kinds


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


def _state_dict(reader: Any, key: str, cfg: dict[str, Any], path: Path
                ) -> tuple[dict[str, np.ndarray], Counter, Codes, list[str], dict[str, str]]:
    """Every tensor dequantized to float32 under its HF name, the converter's changes undone; the type counts; the
    exact codes of the 2-D tensors whose type maps onto a scheme; notes on what came in inexact; and the ggml type
    of every weight of 2 or more dims (HF name -> type)."""
    state: dict[str, np.ndarray] = {}
    halves: dict[str, list] = {}  # fused gate_up_proj of experts: [gate, up]
    types: Counter = Counter()
    codes: Codes = {}
    inexact: Counter = Counter()  # (ggml type, why) -> tensors
    kinds: dict[str, str] = {}
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
        kind = tensor.tensor_type.name
        if len(shape) >= 2:
            kinds[name] = kind
        if kind in GGUF_SCHEMES and len(shape) == 2 and half is None:
            qw = undo_conversion_codes(key, tensor.name, decode(kind, tensor.data, shape[1]), cfg)
            if qw is None:
                inexact[(kind, "the converter changed its values")] += 1
            else:
                codes[name] = (qw, kind)
        elif kind in GGUF_SCHEMES:
            inexact[(kind, "stacked experts [E, out, in] have no exact form yet")] += 1
        elif kind in NEAREST_EXACT:
            nearest = NEAREST_EXACT[kind]
            inexact[(kind, f"no exact scheme; nearest exact type {nearest} = {GGUF_SCHEMES[nearest].name}")] += 1
        if half is None:
            state[name] = w
        else:
            halves.setdefault(name, [None, None])[half] = w
    for name, (gate, up) in halves.items():
        if gate is None or up is None:
            raise BitsmithError(f"GGUF has only one of the expert gate/up tensors for {name!r}", where=str(path),
                                fix=_FIX_FILE)
        state[name] = np.concatenate([gate, up], axis=1)  # [n_expert, 2 * ff, hidden], gate first
    notes = [f"{n} {kind} tensor{'s' * (n > 1)} dequantized to float32 (then the plan decides): {why}"
             for (kind, why), n in sorted(inexact.items())]
    return state, types, codes, notes, kinds


def _traced_exact(module: Module, codes: Codes) -> dict[str, str]:
    """IR weight name -> HF name of the codes a traced module can import: weights read only as a linear's matrix
    (what assign_precision quantizes), and the embedding's codes for a tied lm_head (traced as the embedding
    read by a linear too, or as its own `lm_head.weight`)."""
    uses = weight_uses(module)
    exact = {}
    for hf in codes:
        ir = weight_name(hf)
        if uses.get(ir) == {"linear:1"} and module.weights[ir].shape == codes[hf][0].q.shape:
            exact[ir] = hf
        elif ir == EMBED and uses.get(ir) == {"embedding:0", "linear:1"} and LM_HEAD not in module.weights:
            exact[LM_HEAD] = hf
    tied = "model." + EMBED
    if tied in codes and "lm_head.weight" not in codes and uses.get(LM_HEAD) == {"linear:1"} and (
            module.weights[LM_HEAD].shape == codes[tied][0].q.shape):
        exact[LM_HEAD] = tied
    return exact


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
