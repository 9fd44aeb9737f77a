"""What a weight-loading frontend returns: config, canonical weights, tokenizer and provenance."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.config import ModelConfig, expected_weight_shapes
from bitsmith.compiler.frontends.llama import build_llama_module
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer to ship in the artifact.

    kind "hf": `files` holds tokenizer.json (and optionally tokenizer_config.json) contents.
    kind "llama2c": `files` holds the llama2.c `tok*.bin` bytes under "tokenizer.bin".
    """

    kind: str  # "hf" | "llama2c"
    files: dict[str, bytes]
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None

    def manifest_entry(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "files": sorted(self.files),
            "bos_token_id": self.bos_token_id,
            "eos_token_ids": list(self.eos_token_ids),
            "add_bos": self.add_bos,
            "chat_template": self.chat_template,
        }


@dataclass
class Checkpoint:
    """A loaded model: canonical weights (see `config.py` for names) as numpy arrays."""

    config: ModelConfig
    weights: dict[str, np.ndarray]
    tokenizer: TokenizerSpec | None
    source: dict[str, Any] = field(default_factory=dict)  # {"path", "format", "files": {name: sha256}}
    dtype: str = "float32"  # the checkpoint's own storage dtype
    # pre-quantized sources (GGUF, GPTQ, AWQ, compressed-tensors): the codes of the weights that map exactly to a
    # scheme (`weights` keeps their dequantized float32 too), and each one's source type name (e.g. "Q4_K")
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    quantized_types: dict[str, str] = field(default_factory=dict)

    def validate(self, where: str) -> None:
        """Check that every expected weight exists with the right shape; name the first that does not."""
        expected = expected_weight_shapes(self.config)
        for name, shape in expected.items():
            if name not in self.weights:
                raise BitsmithError(f"weight {name!r} is missing", where=where, fix="is the checkpoint complete?")
            got = tuple(self.weights[name].shape)
            if got != shape:
                raise BitsmithError(
                    f"weight {name!r} has shape {got}, the config implies {shape}",
                    where=where,
                    fix="check that config.json belongs to these weights",
                )
        extra = sorted(set(self.weights) - set(expected))
        if extra:
            raise BitsmithError(
                f"unexpected weights {extra[:4]}{'...' if len(extra) > 4 else ''}",
                where=where,
                fix="this architecture variant is not supported by the hand-written mapping",
            )


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def require_path(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise BitsmithError(f"{what} {str(p)!r} does not exist", fix="check the path")
    return p


@dataclass
class LoadedModel:
    """What every frontend ends in: an IR module plus the weights it names."""

    module: Any  # bitsmith.compiler.ir.Module
    weights: dict[str, np.ndarray]
    tokenizer: TokenizerSpec | None
    config: dict[str, Any]  # ModelConfig.to_json() or, for traced models, the source config
    source: dict[str, Any]
    dtype: str
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # as in Checkpoint
    quantized_types: dict[str, str] = field(default_factory=dict)


def checkpoint_to_model(ckpt: Checkpoint) -> LoadedModel:
    """Build the hand-written Llama-family IR for a checkpoint."""
    module = build_llama_module(ckpt.config, {k: str(v.dtype) for k, v in ckpt.weights.items()})
    return LoadedModel(module, ckpt.weights, ckpt.tokenizer, ckpt.config.to_json(), ckpt.source, ckpt.dtype,
                       ckpt.quantized, ckpt.quantized_types)
