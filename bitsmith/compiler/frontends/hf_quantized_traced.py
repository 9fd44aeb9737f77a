"""Pre-quantized HF directories of traced architectures (Gemma, Phi-3, ...): dequantize, trace, keep the linears' codes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.analysis import weight_uses
from bitsmith.compiler.frontends.base import LoadedModel, sha256_file
from bitsmith.compiler.frontends.graph_lowering import weight_name
from bitsmith.compiler.frontends.hf_files import hf_side_files, rope_settings
from bitsmith.compiler.frontends.hf_quantized import drop_zero_biases, import_quantized
from bitsmith.compiler.frontends.torch_export import trace_module
from bitsmith.compiler.ir import Module
from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import stored_tensors

NOT_A_MATRIX = "not read as the matrix of a linear in the traced graph; kept as its float32 values"


def matrix_only_weights(module: Module) -> set[str]:
    """IR weights read only as a linear's matrix (input 1): the ones a plan quantizes, so codes can stand in."""
    uses = weight_uses(module)
    return {name for name, used in uses.items() if used == {"linear:1"}}


def load_quantized_traced(directory: Path, cfg: dict[str, Any], files: list[Path], method: str) -> LoadedModel:
    """Build the transformers model of `cfg` (its quantization_config dropped) around the dequantized float32 weights,
    trace it, and keep the codes of every imported weight the traced graph reads only as a linear's matrix."""
    import torch  # heavy: torch
    import transformers  # heavy: torch
    from transformers.initialization import no_init_weights  # heavy: torch

    where, model_type = str(directory), cfg.get("model_type")
    tensors: dict[str, Any] = {}
    for path in files:
        tensors.update(stored_tensors(path))
    imported = import_quantized(cfg, tensors, where)  # full checkpoint names ("model.layers.0...")
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    if "lm_head.weight" in imported.weights and plain.get("tie_word_embeddings"):  # its own (quantized) matrix now
        plain["tie_word_embeddings"] = False
        imported.notes.append("lm_head is quantized in the checkpoint: untied from the float embeddings")
    config = transformers.AutoConfig.for_model(**plain)
    with no_init_weights():  # parameters are replaced below; buffers such as RoPE frequencies are built
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    expected = set(model.state_dict()) - ({"lm_head.weight"} if config.tie_word_embeddings else set())
    drop_zero_biases(tensors, imported, expected)
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:  # e.g. per-expert packed MoE layers against transformers' fused expert tensors
        raise BitsmithError(f"the {method} tensors do not match transformers' {model_type!r} model: missing "
                            f"{missing[:4]}, unexpected {unexpected[:4]}", where=where,
                            fix="pre-quantized import needs the checkpoint's tensor names to be the model's")
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in tensors.items()}
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    try:
        theta, scaling = rope_settings(cfg)
        rope = [{"theta": theta, "scaling": scaling}]
    except (BitsmithError, KeyError, TypeError):  # a RoPE kind the IR op lacks: left unfused (still correct)
        rope = []
    module, weights = trace_module(model, torch.arange(2, 10), rope, meta={"architecture": model_type})
    matrices = matrix_only_weights(module)
    requantized = {weight_name(k): v for k, v in imported.requantized.items()}
    quantized = {}
    for hf, qw in imported.quantized.items():  # from here on, names are the IR's
        ir = weight_name(hf)
        if ir in matrices and module.weights[ir].shape == qw.q.shape:
            quantized[ir] = qw
        else:
            requantized[ir] = NOT_A_MATRIX
    imported.quantized, imported.requantized = quantized, requantized
    imported.types = {weight_name(k): v for k, v in imported.types.items()}
    tokenizer, config_json = hf_side_files(directory, cfg)
    source = {"path": str(directory.resolve()), "format": "hf-torch-export",
              "files": {p.name: sha256_file(p) for p in [*files, directory / "config.json"]},
              **imported.source_fields(method)}
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16")
    return LoadedModel(module, weights, tokenizer, config_json, source, dtype, imported.quantized,
                       imported.exact_types())
