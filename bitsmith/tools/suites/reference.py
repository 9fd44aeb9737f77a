"""The unquantized reference of an artifact, as an artifact the suites can run on kernels (compiled once, cached)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import bitsmith
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, is_artifact, load_artifact

CACHE_ENV = "BITSMITH_REFERENCE_CACHE"


def reference_cache() -> Path:
    """Where compiled references live: $BITSMITH_REFERENCE_CACHE, else ~/.cache/bitsmith/references."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "bitsmith" / "references"


def is_quantized(artifact: Artifact) -> bool:
    """Does the artifact differ from its source by more than storage dtype: quantized weights (its own or imported
    codes) or an int8/int4 KV cache?"""
    meta = artifact.manifest["ir"].get("meta", {})
    plan = meta.get("precision_plan") or {}
    quantized_kv = bool({"int8", "int4"} & set((meta.get("kv_plan") or {}).get("layer_dtypes", ())))
    return quantized_kv or any(v is not None for v in plan.values())


def _compile_settings(artifact: Artifact) -> dict:
    """What the reference shares with the artifact: context, sequences at once, kernel target."""
    compiled = artifact.manifest.get("compile") or {}
    kv = artifact.manifest.get("kv_plan") or {}
    target = dict(compiled.get("target") or {"name": "host"})
    target.pop("activations", None)  # the reference multiplies in float32 (no int8 GEMV inputs)
    return {"context": int(kv.get("max_context") or artifact.max_context),
            "concurrency": int(kv.get("concurrency") or 4), "target": target}


def reference_key(source: Path, settings: dict) -> str:
    """Cache key: the source (path, size, mtime), the settings, the bitsmith version."""
    stat = source.stat()
    size = stat.st_size if source.is_file() else sum(p.stat().st_size for p in source.rglob("*") if p.is_file())
    mtime = stat.st_mtime if source.is_file() else max([stat.st_mtime] + [p.stat().st_mtime for p in source.iterdir()])
    blob = json.dumps({"source": str(source.resolve()), "size": size, "mtime": mtime, "settings": settings,
                       "bitsmith": bitsmith.__version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def compile_reference(source: Path, settings: dict, log: Callable[[str], None] | None = None) -> Path:
    """The source compiled without quantization (a pre-quantized source dequantized: requantize with no method)
    into the reference cache; reused when the key matches (the kernels come from the kernel cache)."""
    from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
    from bitsmith.pipeline import compile_model  # heavy: TVM

    out = reference_cache() / reference_key(source, settings)
    if is_artifact(out):
        if log:
            log(f"reference: reusing {out}")
        return out
    t = settings["target"]
    options = CompileOptions(quant=QuantOptions(requantize=True),
                             memory=MemoryOptions(context=settings["context"], concurrency=settings["concurrency"]),
                             target=TargetOptions(t.get("name", "host"), t.get("arch"), "float32", t.get("cpu"),
                                                  tuple(t.get("features") or ())))
    if log:
        log(f"reference: compiling {source} unquantized (context {settings['context']}, target {t.get('name')}) "
            f"-> {out}")
    out.parent.mkdir(parents=True, exist_ok=True)
    compile_model(source, out, options, log=log)
    return out


def resolve_reference(artifact_path: str | Path, reference: str | Path | None,
                      log: Callable[[str], None] | None = None) -> tuple[Path, str]:
    """(reference artifact path, description): `reference` when it is an artifact; a model path compiled
    unquantized with the artifact's context and target; without one, the artifact's source (manifest provenance)
    compiled so, or the artifact itself when it is not quantized."""
    artifact = load_artifact(artifact_path, check_hashes=False)
    if reference is not None:
        if is_artifact(reference):
            return Path(reference), str(reference)
        source = Path(reference)
        if not source.exists():
            raise BitsmithError(f"reference {str(source)!r} does not exist", where="eval suites",
                                fix="pass --reference an artifact directory or a model path")
        return compile_reference(source, _compile_settings(artifact), log), f"{source} (unquantized)"
    if not is_quantized(artifact):
        return Path(artifact_path), "the artifact itself (not quantized)"
    path = (artifact.manifest.get("provenance", {}).get("source") or {}).get("path")
    if not path or not Path(path).exists():
        raise BitsmithError(f"the artifact's source {path!r} is not available to build the unquantized reference",
                            where=str(artifact_path), fix="pass --reference MODEL_OR_ARTIFACT")
    return compile_reference(Path(path), _compile_settings(artifact), log), f"{path} (unquantized)"
