"""Picks the frontend for a model path (HF directory, .gguf, llama2.c .bin, .onnx) and loads it."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from bitsmith.compiler.default_model import default_model_path
from bitsmith.compiler.frontends.base import LoadedModel, checkpoint_to_model
from bitsmith.compiler.frontends.gguf import load_gguf
from bitsmith.compiler.frontends.hf import load_hf
from bitsmith.compiler.frontends.llama2c import load_llama2c
from bitsmith.compiler.frontends.onnx import load_onnx
from bitsmith.errors import BitsmithError

FORMATS = "a Hugging Face directory, a .gguf file, a llama2.c .bin checkpoint or an .onnx decoder"


def detect_format(path: Path) -> str:
    if not path.exists():
        raise BitsmithError(f"model path {str(path)!r} does not exist", fix=f"pass {FORMATS}")
    if path.is_dir():
        if (path / "config.json").exists():
            return "hf"
        raise BitsmithError(f"directory {path} has no config.json", fix=f"pass {FORMATS}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF" or path.suffix == ".gguf":
        return "gguf"
    if path.suffix == ".onnx":
        return "onnx"
    if path.suffix == ".bin":
        return "llama2c"
    raise BitsmithError(f"cannot tell the format of {path}", fix=f"pass {FORMATS}")


def load_model(source: str | Path | None, tokenizer: str | None = None,
               log: Callable[[str], None] | None = None) -> LoadedModel:
    """Load any supported model into IR + weights. `None` means the built-in default model."""
    if source is None:
        source = default_model_path()
    path = Path(source)
    fmt = detect_format(path)
    if log:
        log(f"loading {fmt} model from {path}")
    if fmt == "hf":
        loaded = load_hf(path)
    elif fmt == "gguf":
        loaded = load_gguf(path)
    elif fmt == "llama2c":
        loaded = load_llama2c(path, tokenizer_path=tokenizer)
    else:
        loaded = load_onnx(path)
    if log:
        for note in loaded.source.get("notes", ()):  # e.g. GGUF tensors that could not come in exact
            log(f"note: {note}")
    return loaded if isinstance(loaded, LoadedModel) else checkpoint_to_model(loaded)
