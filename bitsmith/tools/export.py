"""`bitsmith export`: an artifact's weights in another engine's format (GGUF, compressed-tensors, GPTQ, ONNX)."""

from __future__ import annotations

import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from bitsmith.compiler.ops.quant import qlinear_input_names
from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, load_artifact
from bitsmith.runtime.packed_layout import unpack

if TYPE_CHECKING:
    from bitsmith.runtime.quant_scheme import QuantizedWeight

# format -> "module:function" with the signature (artifact_dir: Path, out: Path, options) -> ExportReport; imported
# only when that format is asked for (gguf-py, onnx and the HF packages stay out of the CLI's start-up).
FORMATS: dict[str, str] = {
    "gguf": "bitsmith.tools.export_gguf:export_gguf",
    "compressed-tensors": "bitsmith.tools.export_hf:export_compressed_tensors",
    "gptq": "bitsmith.tools.export_hf:export_gptq",
    "onnx": "bitsmith.tools.export_onnx:export_onnx",
}
EXPORT_FORMATS = tuple(FORMATS)


@dataclass(frozen=True)
class ExportOptions:
    """What `bitsmith export` was asked for: the format, and whether a scheme with no exact target type may be
    converted (requantized from the dequantized weights, each such tensor reported with its error)."""

    format: str
    allow_requantize: bool = False
    accuracy_level: int = 0  # onnx only: MatMulNBits accuracy_level (4 = int8 activations)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise BitsmithError(f"unknown export format {self.format!r}", where="bitsmith export",
                                fix=f"use one of {', '.join(EXPORT_FORMATS)}")
        if self.accuracy_level not in (0, 1, 2, 3, 4):
            raise BitsmithError(f"accuracy level {self.accuracy_level!r}", where="bitsmith export",
                                fix="use 0 (float activations) or 4 (int8 activations in MatMulNBits)")
        if self.accuracy_level and self.format != "onnx":
            raise BitsmithError("--accuracy-level applies to --format onnx only", where="bitsmith export",
                                fix="drop --accuracy-level, or export --format onnx")


@dataclass(frozen=True)
class TensorExport:
    """One tensor as written: its name in the output, our scheme ("float16", "int4-g32-sym-rtn"), the target type
    ("Q4_0", "pack-quantized int4 g32", "MatMulNBits 4-bit b32"), exact or converted and then the max abs error."""

    name: str
    scheme: str
    target: str
    exact: bool = True
    max_abs_error: float = 0.0


@dataclass
class ExportReport:
    """What an export wrote: one TensorExport per tensor, plus notes (metadata, tokenizer, what was left out)."""

    format: str
    output: str
    tensors: list[TensorExport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def requantized(self) -> list[TensorExport]:
        return [t for t in self.tensors if not t.exact]

    def to_json(self) -> dict[str, Any]:
        return {"format": self.format, "output": self.output, "notes": list(self.notes),
                "tensors": [{"name": t.name, "scheme": t.scheme, "target": t.target, "exact": t.exact,
                             "max_abs_error": t.max_abs_error} for t in self.tensors]}


def online_rotations(artifact: Artifact) -> str:
    """The artifact's online rotations (rotate_ffn_online / rotate_keys_online), as text; '' when it has none."""
    meta = artifact.manifest["ir"].get("meta", {}).get("rotation", {})
    return ", ".join(f"{kind}: {meta[kind]}" for kind in ("ffn", "keys") if kind in meta)


def format_report(report: ExportReport) -> str:
    """The per-tensor table, then one line of totals and the notes."""
    width = max([len(t.name) for t in report.tensors] + [6])
    swidth = max([len(t.scheme) for t in report.tensors] + [6])
    lines = [f"{'tensor':<{width}}  {'scheme':<{swidth}}  {'type':<12} conversion"]
    for t in report.tensors:
        how = "exact" if t.exact else f"requantized, max abs error {t.max_abs_error:.3g}"
        lines.append(f"{t.name:<{width}}  {t.scheme:<{swidth}}  {t.target:<12} {how}")
    n_req = len(report.requantized)
    lines.append(f"{report.format}: {len(report.tensors)} tensors, {len(report.tensors) - n_req} exact, "
                 f"{n_req} requantized -> {report.output}")
    lines.extend(f"note: {n}" for n in report.notes)
    return "\n".join(lines)


def exporter(fmt: str) -> Callable[[Path, Path, ExportOptions], ExportReport]:
    """The export function of a format, imported now."""
    module_name, _, function = FORMATS[fmt].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        ours = (exc.name or "").startswith("bitsmith")
        raise BitsmithError(f"the {fmt} exporter cannot be imported: {exc}", where=f"bitsmith export --format {fmt}",
                            fix="this bitsmith has no such exporter yet: use another --format" if ours
                            else f"install the package it names (pip install {exc.name})") from exc
    return getattr(module, function)


def export(artifact: str | Path, out: str | Path, options: ExportOptions) -> ExportReport:
    """Export `artifact` to `out` (a file or a directory, as the format writes): the exporter writes into a temp
    directory beside `out`, which is renamed into place only when it succeeded, so a failure leaves nothing."""
    artifact, out = Path(artifact), Path(out)
    online = online_rotations(load_artifact(artifact))  # validated (manifest, sizes, hashes) before anything is written
    if online:
        raise BitsmithError(f"{artifact} was compiled with --rotate: its online Hadamard ops ({online}) have no "
                            f"{options.format} form, and the folded rotations need them", where="bitsmith export",
                            fix="export an artifact compiled without --rotate, or with --rotate and "
                                "RotationOptions(ffn=False, keys=False) (folded rotations only)")
    if out.is_dir() and any(out.iterdir()):
        raise BitsmithError(f"{out} exists and is a non-empty directory", where="bitsmith export",
                            fix="choose another -o or remove it")
    fn = exporter(options.format)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        staged = tmp / out.name
        report = fn(artifact, staged, options)
        if not staged.exists():
            raise BitsmithError(f"the {options.format} exporter wrote nothing", where="bitsmith export",
                                fix="report this as a bug")
        if out.is_dir():
            out.rmdir()  # empty (checked above)
        elif out.exists() and staged.is_dir():
            out.unlink()  # a file where a directory goes: replaced, as a file over a file is
        os.replace(staged, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.output = str(out)
    return report


# -- reading an artifact's weights back, for every exporter ---------------------------------------------------------

def _weight_names(fn: Any) -> dict[str, str]:
    """IR value -> weight name, in one function of the artifact's IR."""
    return {n["outputs"][0]: n["attrs"]["name"] for n in fn["nodes"] if n["op"] == "weight"}


def qlinear_parts(artifact: Artifact) -> dict[str, dict[str, Any]]:
    """Weight name ("layers.0.mlp.down_proj.weight") -> {"attrs": the qlinear attrs, "parts": {"qweight": name,
    "scales": name, ...}} for every packed weight in the artifact's IR (2-D qlinear only)."""
    found: dict[str, dict[str, Any]] = {}
    for fn in artifact.manifest["ir"]["functions"].values():
        names = _weight_names(fn)
        for node in fn["nodes"]:
            if node["op"] != "qlinear":
                continue
            attrs, inputs = node["attrs"], node["inputs"]
            kinds = [k for k in qlinear_input_names(attrs) if k != "bias"]
            parts = {kind: names[value] for kind, value in zip(kinds, inputs[1:1 + len(kinds)])}
            weight = parts["qweight"].removesuffix(".qweight") + ".weight"
            found[weight] = {"attrs": attrs, "parts": parts}
    return found


def quantized_weights(artifact: Artifact) -> dict[str, QuantizedWeight]:
    """Weight name -> QuantizedWeight (unpacked codes, scales as stored) of every packed 2-D weight, its scheme
    from the manifest's precision plan."""
    from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme

    plan = artifact.manifest["ir"].get("meta", {}).get("precision_plan") or {}
    weights = artifact.weights
    out: dict[str, QuantizedWeight] = {}
    for name, info in qlinear_parts(artifact).items():
        attrs, parts = info["attrs"], info["parts"]
        if name not in plan:
            raise BitsmithError(f"packed weight {name!r} has no entry in the precision plan", where=str(artifact.directory),
                                fix="recompile the artifact with this bitsmith")
        scheme = QuantScheme.from_json(plan[name])
        q = unpack(np.asarray(weights[parts["qweight"]]), attrs["bits"], attrs["in_features"])
        extra = {k: np.asarray(weights[parts[k]]) for k in ("super_scales", "super_zeros", "perm") if k in parts}
        zeros = np.asarray(weights[parts["zeros"]]) if "zeros" in parts else None
        out[name] = QuantizedWeight(q, np.asarray(weights[parts["scales"]]), zeros, scheme, attrs["in_features"],
                                    **extra)
    return out


def dense_weights(artifact: Artifact) -> dict[str, np.ndarray]:
    """Weight name -> array as stored, for every weight that is not a packed part."""
    packed = {p for info in qlinear_parts(artifact).values() for p in info["parts"].values()}
    return {name: w for name, w in artifact.weights.items() if name not in packed}
