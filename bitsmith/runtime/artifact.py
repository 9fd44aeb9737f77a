"""Loads and validates an artifact directory (manifest.json, weights.safetensors, tokenizer files)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import StoredTensor, read_safetensors, stored_tensors
from bitsmith.runtime.tokenizer import load_tokenizer

ARTIFACT_FORMAT = "bitsmith-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
REQUIRED_KEYS = ("format", "schema_version", "model", "ir", "weights", "tokenizer", "files", "provenance")


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


@dataclass
class Artifact:
    """A validated artifact; weights are memory-mapped on first use."""

    directory: Path
    manifest: dict[str, Any]

    @cached_property
    def weights(self) -> dict[str, np.ndarray]:
        return read_safetensors(self.directory / WEIGHTS)

    @cached_property
    def stored_weights(self) -> dict[str, StoredTensor]:
        """name -> StoredTensor: where each weight lies in the file, for loaders that read it into their own memory."""
        return stored_tensors(self.directory / WEIGHTS)

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def max_context(self) -> int:
        return int(self.config.get("max_position", 2048))

    def tokenizer(self):
        if not self.manifest["tokenizer"]:
            raise BitsmithError("artifact has no tokenizer", where=str(self.directory),
                                fix="recompile with a tokenizer (--tokenizer PATH for llama2.c checkpoints)")
        return load_tokenizer(self.directory, self.manifest["tokenizer"])


def _bad(directory: Path, problem: str, fix: str = "recompile the model with `bitsmith compile`") -> BitsmithError:
    return BitsmithError(problem, where=str(directory), fix=fix)


def load_artifact(path: str | Path, check_hashes: bool = True) -> Artifact:
    """Read manifest.json and check schema version, required keys, file presence, sizes and hashes."""
    directory = Path(path)
    if not directory.exists():
        raise _bad(directory, "artifact directory does not exist", "check the path, or build one with `bitsmith compile`")
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise _bad(directory, f"not an artifact: {MANIFEST} is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise _bad(directory, f"{MANIFEST} is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise _bad(directory, f"{MANIFEST} is not a bitsmith manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise _bad(directory, f"artifact schema version {manifest.get('schema_version')!r} is not supported "
                              f"(this bitsmith reads version {SCHEMA_VERSION})")
    missing = [k for k in REQUIRED_KEYS if k not in manifest]
    if missing:
        raise _bad(directory, f"{MANIFEST} lacks {missing}")
    for name, info in manifest["files"].items():
        file = directory / name
        if not file.is_file():
            raise _bad(directory, f"artifact file {name} is missing")
        if file.stat().st_size != info["bytes"]:
            raise _bad(directory, f"{name} has {file.stat().st_size} bytes, the manifest says {info['bytes']}")
        if check_hashes and sha256_of(file) != info["sha256"]:
            raise _bad(directory, f"{name} does not match its sha256 in the manifest (the file was modified or corrupted)")
    return Artifact(directory, manifest)
