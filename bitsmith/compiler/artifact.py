"""Writes an artifact directory atomically: build everything in a temp dir beside it, then rename."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
from tqdm import tqdm

import bitsmith
from bitsmith.compiler.frontends.base import TokenizerSpec
from bitsmith.compiler.ir import Module
from bitsmith.compiler.weight_stats import summarize, weight_table
from bitsmith.compiler.weight_store import WeightStore
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import (
    ARTIFACT_FORMAT, MANIFEST, SCHEMA_VERSION, WEIGHTS, is_artifact, sha256_of,
)
from bitsmith.runtime.safetensors_io import write_safetensors


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _prepare_destination(out: Path) -> None:
    if out.exists() and not is_artifact(out) and (not out.is_dir() or any(out.iterdir())):
        raise BitsmithError(f"{out} exists and is not a bitsmith artifact", where=str(out),
                            fix="choose another -o directory or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` by `tmp` so that a reader sees either the old or the new artifact, never a mix."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    os.replace(out, old / "artifact")
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


SPILL = ".spill"  # inside the staging directory: the weights passes wrote, one file per tensor


@contextlib.contextmanager
def staging_directory(out: str | Path) -> Iterator[Path]:
    """A temp directory beside `out` to build the artifact in (its SPILL subdirectory takes the weights passes
    write while the compile runs); removed on failure, and by `write_artifact` when it moves into place."""
    out = Path(out)
    _prepare_destination(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_artifact(out: str | Path, module: Module, weights: Mapping[str, np.ndarray],
                   tokenizer: TokenizerSpec | None, config: dict[str, Any], compile_options: dict[str, Any],
                   source: dict[str, Any], kernels: dict[str, Any] | None = None,
                   extra_files: Mapping[str, Path] | None = None, memory_plan: dict[str, int] | None = None,
                   staging: Path | None = None) -> Path:
    """Write manifest.json, weights.safetensors, tokenizer files and kernels/ to `out`; nothing is left on failure.

    kernels: the manifest's `kernels` entry (KernelPlan JSON), None when the artifact has none;
    extra_files: artifact-relative path -> file to copy in (the kernel libraries);
    staging: the staging_directory to build in (default: a new one). File-backed weights are streamed into
    weights.safetensors a chunk at a time, and each spill file is deleted once copied.
    """
    if staging is None:
        with staging_directory(out) as tmp:
            return write_artifact(out, module, weights, tokenizer, config, compile_options, source, kernels,
                                  extra_files, memory_plan, tmp)
    out, tmp = Path(out), Path(staging)
    store = weights if isinstance(weights, WeightStore) else WeightStore(weights)
    try:
        names = sorted(module.weights)
        total = sum(store.nbytes(n) for n in names)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing weights", leave=False,
                  disable=total < (64 << 20)) as bar:
            write_safetensors(tmp / WEIGHTS, ((n, store.entry(n)) for n in names), {"format": "bitsmith"},
                              progress=bar)
        shutil.rmtree(tmp / SPILL, ignore_errors=True)
        if tokenizer is not None:
            for name, data in tokenizer.files.items():
                (tmp / name).write_bytes(data)
        for relative, path in (extra_files or {}).items():
            (tmp / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, tmp / relative)
        files = {p.relative_to(tmp).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_of(p)}
                 for p in sorted(tmp.rglob("*")) if p.is_file()}
        bytes_by_dtype: dict[str, int] = {}
        for n in names:
            bytes_by_dtype[str(store.dtype(n))] = bytes_by_dtype.get(str(store.dtype(n)), 0) + store.nbytes(n)
        table = weight_table(module, {n: store.nbytes(n) for n in names})
        totals = summarize(table)
        manifest = {
            "format": ARTIFACT_FORMAT,
            "schema_version": SCHEMA_VERSION,
            "model": config,
            "ir": module.to_json(),
            "weights": {"file": WEIGHTS, "count": len(names), "bytes_by_dtype": bytes_by_dtype,
                        "parameters": totals["parameters"], "bytes": totals["bytes"],
                        "bits_per_weight": totals["bits_per_weight"],
                        "table": {k: {"params": v["params"], "bytes": v["bytes"]} for k, v in table.items()}},
            "tokenizer": tokenizer.manifest_entry() if tokenizer else None,
            "compile": compile_options,
            "kernels": kernels,
            "kv_plan": module.meta.get("kv_plan"),
            "memory_plan": memory_plan,
            "files": files,
            "provenance": {
                "source": source,
                "bitsmith_version": bitsmith.__version__,
                "tvm_version": package_version("apache-tvm"),
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
        _swap_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
