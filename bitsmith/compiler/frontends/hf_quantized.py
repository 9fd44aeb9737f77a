"""Pre-quantized HF directories (GPTQ, AWQ GEMM, compressed-tensors pack-quantized): codes and scales kept exactly."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.frontends.hf_files import read_json
from bitsmith.compiler.hf_quant_formats import (
    FormatError,
    UnpackedCodes,
    unpack_awq,
    unpack_compressed,
    unpack_gptq,
)
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import (
    SUPPORTED_BITS,
    SUPPORTED_GROUP_SIZES,
    QuantizedWeight,
    QuantScheme,
)

METHODS = ("gptq", "awq", "compressed-tensors")
# Largest of our group sizes first: a source group of G columns is expressed exactly as G/g groups of g
# columns with its scale (and zero) repeated, so GPTQ g256 comes in as g128 with each scale twice.
SUBGROUPS = tuple(sorted((g for g in SUPPORTED_GROUP_SIZES if g > 0), reverse=True))


@dataclass
class ImportResult:
    """What a pre-quantized directory gave: float32 weights of every quantized layer (exact values of the source's
    dequantization), the exact ones' codes, every layer's source type name, and the reason for each layer that cannot
    come in exactly (it is then requantized under the compile scheme, from those float32 values)."""

    weights: dict[str, np.ndarray] = field(default_factory=dict)
    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)
    types: dict[str, str] = field(default_factory=dict)
    requantized: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def exact_types(self) -> dict[str, str]:
        """Source type of each exact weight (Checkpoint.quantized_types)."""
        return {name: self.types[name] for name in self.quantized}

    def source_fields(self, method: str) -> dict[str, Any]:
        """What the manifest's provenance records: `weight_types` (every quantized source tensor; `inspect` lists
        the ones not in `quantized` as converted), `notes` (one per reason a layer is not exact, naming the layers)
        and a compact `quantized_import` summary."""
        by_reason: dict[str, list[str]] = {}
        for name, reason in sorted(self.requantized.items()):
            by_reason.setdefault(reason, []).append(name)
        notes = list(self.notes) + [
            f"{len(names)} layer(s) not exact ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''}): {reason}; "
            "they come in as their float32 values (quantized again only by --method/--scheme)"
            for reason, names in by_reason.items()]
        summary = {"method": method, "exact": len(self.quantized), "types": sorted(set(self.exact_types().values())),
                   "requantized": dict(sorted(self.requantized.items()))}
        return {"weight_types": dict(sorted(self.types.items())), "notes": notes, "quantized_import": summary}


# Older writers keep the quantization settings beside config.json: AutoGPTQ's quantize_config.json and
# AutoAWQ's quant_config.json (their method is implied by the file).
SIDE_CONFIGS = {"quantize_config.json": "gptq", "quant_config.json": "awq"}


def quantization_method(cfg: dict[str, Any], directory: Path | None = None) -> str | None:
    """quant_method of config.json's quantization_config (lower case), or None for a float checkpoint. With
    `directory`, a side file (SIDE_CONFIGS) stands in for a missing quantization_config (put into `cfg`)."""
    if "quantization_config" not in cfg and directory is not None:
        for name, method in SIDE_CONFIGS.items():
            if (directory / name).exists():
                cfg["quantization_config"] = {"quant_method": method, **read_json(directory / name)}
                break
    qc = cfg.get("quantization_config")
    return str(qc.get("quant_method", "")).lower() if isinstance(qc, Mapping) else None


def to_quantized(codes: UnpackedCodes, group_size: int) -> QuantizedWeight | str:
    """The exact QuantizedWeight of unpacked codes, or the reason (naming the nearest scheme) why there is none.

    Act-order: columns are sorted by their group (stable), so every group is contiguous; `perm` records the order.
    Symmetric when every zero point is 2^(bits-1); otherwise asym with the integer zero points as float16."""
    n_in = codes.q.shape[1]
    n_groups = codes.scales.shape[1]
    g = group_size if 0 < group_size < n_in else n_in
    if codes.bits not in SUPPORTED_BITS:
        return f"{codes.bits}-bit codes have no scheme (bits {SUPPORTED_BITS}); nearest: requantize to int4 or int8"
    perm = np.argsort(codes.g_idx, kind="stable").astype(np.int32)
    counts = np.bincount(codes.g_idx, minlength=n_groups)
    if (counts[:-1] != g).any() or not 0 < counts[-1] <= g:
        return (f"g_idx gives groups of {sorted(set(counts.tolist()))} columns, not {g}: no contiguous grouping; "
                f"nearest: requantize (e.g. int{codes.bits}-g128-asym)")
    if n_groups == 1:
        sub = -1
    else:
        sub = next((s for s in SUBGROUPS if g % s == 0), None)
        if sub is None:
            return (f"groups of {g} columns are not a multiple of {SUBGROUPS[-1]}; nearest: requantize to "
                    f"int{codes.bits}-g{min(SUBGROUPS, key=lambda s: abs(s - g))}-asym")
    repeat = 1 if sub == -1 else g // sub
    scheme_probe = QuantScheme(codes.bits, sub, False, "imported")
    keep = scheme_probe.n_groups(n_in)
    scales = np.repeat(codes.scales, repeat, axis=1)[:, :keep]
    s16 = scales.astype(np.float16)
    if scales.dtype != np.float16:
        exact = np.isfinite(s16).all() and np.array_equal(s16.astype(np.float32), scales.astype(np.float32))
        if not exact:
            group_name = f"g{sub}" if sub > 0 else "pc"
            return (f"{scales.dtype} scales are not all representable in float16 (our scale type); nearest: "
                    f"requantize to int{codes.bits}-{group_name}-{'sym' if codes.zeros is None else 'asym'}")
    zeros = codes.zero_points()
    sym = bool((zeros == (1 << (codes.bits - 1))).all())
    z16 = None if sym else np.repeat(zeros, repeat, axis=1)[:, :keep].astype(np.float16)
    q = codes.q
    identity = bool((perm == np.arange(n_in)).all())
    if not identity:
        q = np.ascontiguousarray(q[:, perm])
    return QuantizedWeight(q, s16, z16, QuantScheme(codes.bits, sub, sym, "imported"), n_in,
                           perm=None if identity else perm)


# ------------------------------------------------------------------------------------------------ per format
def checkpoint_name(name: str) -> str:
    """The module's name in the checkpoint (what targets and patterns match): the hand-written frontend strips
    "model." from decoder layers; the traced one keeps names as they are."""
    return f"model.{name}" if name.startswith("layers.") else name


def _module_names(weights: Mapping[str, Any], suffix: str) -> list[str]:
    return sorted(k[: -len(suffix)] for k in weights if k.endswith(suffix))


def _read(weights: dict[str, Any], name: str, where: str, required: bool = True) -> np.ndarray | None:
    if name not in weights:
        if required:
            raise BitsmithError(f"tensor {name!r} is missing", where=where, fix="is the checkpoint complete?")
        return None
    return np.asarray(weights.pop(name))


Layers = dict[str, tuple[UnpackedCodes, int, str]]  # layer name -> (codes, source group size, source type name)


def _unpacked(name: str, unpack: Callable[..., UnpackedCodes], *args: Any, **kwargs: Any) -> UnpackedCodes:
    try:
        return unpack(*args, **kwargs)
    except FormatError as exc:  # name the layer (import_quantized adds the file)
        raise FormatError(f"{checkpoint_name(name)}: {exc}") from exc


def _gptq_layers(qc: Mapping[str, Any], weights: dict[str, Any], where: str, notes: list[str]) -> Layers:
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in ("gptq", "gptq_v2"):
        raise BitsmithError(f"GPTQ checkpoint_format {fmt!r} is not supported", where=where,
                            fix="use a 'gptq' (v1) or 'gptq_v2' checkpoint (GPTQModel can convert marlin/bitblas back)")
    if str(qc.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
        raise BitsmithError(f"GPTQ pack_dtype {qc.get('pack_dtype')!r} is not supported", where=where,
                            fix="re-save the checkpoint with pack_dtype int32 (the default)")
    dynamic = qc.get("dynamic") or {}
    layers = {}
    for name in _module_names(weights, ".qweight"):
        args = dict(qc)
        full = checkpoint_name(name)
        for pattern, override in dynamic.items():  # GPTQModel's per-module overrides: the first match decides
            if re.match(pattern[2:] if pattern.startswith(("+:", "-:")) else pattern, full):
                args.update(override if not pattern.startswith("-:") else {})  # "-:" modules are float anyway
                break
        bits, group = int(args.get("bits", 4)), int(args.get("group_size", 128))
        if bits not in (2, 3, 4, 8):  # GPTQModel writes 5/6/7 bits only in its planar layout ("gptq_p")
            raise BitsmithError(f"{bits}-bit GPTQ ({checkpoint_name(name)}) has no continuous layout", where=where,
                                fix="import 2/3/4/8-bit GPTQ checkpoints")
        tensors = [_read(weights, f"{name}.{t}", where) for t in ("qweight", "qzeros", "scales")]
        g_idx = _read(weights, f"{name}.g_idx", where, required=False)
        codes = _unpacked(name, unpack_gptq, *tensors, g_idx, bits, group, v1=fmt == "gptq")
        layers[name] = (codes, group, f"gptq{'-v2' if fmt == 'gptq_v2' else ''}-int{bits}-g{group}")
    return layers


def _awq_layers(qc: Mapping[str, Any], weights: dict[str, Any], where: str, notes: list[str]) -> Layers:
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise BitsmithError(f"AWQ version {version!r} is not supported (its packing differs)", where=where,
                            fix="use an AWQ GEMM checkpoint (version 'gemm', the AutoAWQ default)")
    if qc.get("zero_point") is False:
        raise BitsmithError("AWQ without zero points is not supported", where=where,
                            fix="use an AWQ checkpoint quantized with zero_point=true (the AutoAWQ default)")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    layers = {}
    for name in _module_names(weights, ".qweight"):
        tensors = [_read(weights, f"{name}.{t}", where) for t in ("qweight", "qzeros", "scales")]
        layers[name] = (_unpacked(name, unpack_awq, *tensors, bits, group), group, f"awq-int{bits}-g{group}")
    return layers


def _ct_scheme(qc: Mapping[str, Any], name: str) -> tuple[str, dict[str, Any]]:
    """(config group name, group dict) of a module: exact name, then "re:" regex, then class name (Linear)."""
    full = checkpoint_name(name)
    groups = qc.get("config_groups") or {}
    ranked = []
    for key, group in groups.items():
        for target in group.get("targets", []):
            if target == full or target == name:
                ranked.append((0, key, group))
            elif target.startswith("re:") and re.match(target[3:], full):
                ranked.append((1, key, group))
            elif target in ("Linear", "torch.nn.Linear"):
                ranked.append((2, key, group))
    if not ranked:
        raise BitsmithError(f"{full} has packed weights but no config_group targets it", where="quantization_config",
                            fix="check config_groups' targets")
    _, key, group = min(ranked, key=lambda r: r[0])
    return key, group


def _ct_layers(qc: Mapping[str, Any], weights: dict[str, Any], where: str, notes: list[str]) -> Layers:
    status = qc.get("quantization_status", "compressed")
    if status != "compressed":
        raise BitsmithError(f"compressed-tensors quantization_status {status!r}: weights are not compressed",
                            where=where, fix="save the model compressed (save_compressed=True)")
    for extra in ("sparsity_config", "transform_config"):
        if qc.get(extra):
            raise BitsmithError(f"compressed-tensors {extra} is not supported", where=where,
                                fix="use a dense pack-quantized checkpoint")
    layers = {}
    for name in _module_names(weights, ".weight_packed"):
        key, group = _ct_scheme(qc, name)
        fmt = group.get("format") or qc.get("format")
        w = group.get("weights") or {}
        if fmt != "pack-quantized" or w.get("type", "int") != "int":
            raise BitsmithError(f"config group {key!r}: format {fmt!r}, type {w.get('type')!r} is not supported",
                                where=where, fix="import int weights in the 'pack-quantized' format")
        strategy = w.get("strategy", "group")
        if strategy not in ("group", "channel", "tensor"):
            raise BitsmithError(f"config group {key!r}: strategy {strategy!r} is not supported", where=where,
                                fix="use the group, channel or tensor strategy")
        note = f"config group {key!r} quantizes activations too; they are not imported (activations stay float)"
        if group.get("input_activations") and note not in notes:
            notes.append(note)
        bits, size = int(w.get("num_bits", 4)), int(w.get("group_size") or -1) if strategy == "group" else -1
        packed, scale, shape = (_read(weights, f"{name}.{t}", where) for t in ("weight_packed", "weight_scale",
                                                                              "weight_shape"))
        zp = _read(weights, f"{name}.weight_zero_point", where, required=False)
        g_idx = _read(weights, f"{name}.weight_g_idx", where, required=False)
        if w.get("symmetric", True):
            zp = None  # a symmetric scheme's zero point is 0 (stored or not)
        codes = _unpacked(name, unpack_compressed, packed, scale, zp, shape, bits, size, g_idx)
        layers[name] = (codes, size, f"compressed-tensors-int{bits}-{f'g{size}' if size > 0 else strategy}")
    return layers


def drop_zero_biases(weights: dict[str, Any], imported: ImportResult, expected: set[str]) -> None:
    """Drop the all-zero `.bias` of imported layers the model has no bias for: AutoGPTQ-era writers store one for
    every quantized linear (vLLM skips them too). A non-zero one stays, and validation names it."""
    for name in [k for k in weights if k.endswith(".bias") and k not in expected]:
        if name.removesuffix(".bias") + ".weight" in imported.weights and not np.asarray(weights[name]).any():
            del weights[name]


READERS: dict[str, Callable[..., Layers]] = {
    "gptq": _gptq_layers, "awq": _awq_layers, "compressed-tensors": _ct_layers}


def import_quantized(cfg: Mapping[str, Any], weights: dict[str, Any], where: str) -> ImportResult:
    """Replace the packed tensors of `weights` by float32 `<layer>.weight`; return the codes. Names are the
    checkpoint's, or (hand-written frontend) with "model." stripped from the decoder layers.

    The float32 weight is the source's own dequantization, (q - z) * s in float32 (exact for fp16/bf16 scales)."""
    method = quantization_method(cfg)
    qc = cfg["quantization_config"]
    if method not in METHODS:
        raise BitsmithError(f"quantization_config quant_method {method!r} is not supported", where=where,
                            fix=f"bitsmith imports {', '.join(METHODS)} checkpoints; dequantize others to float first")
    result = ImportResult()
    try:
        layers = READERS[method](qc, weights, where, result.notes)
    except FormatError as exc:
        raise BitsmithError(f"{method} tensors do not match their layout: {exc}", where=where,
                            fix="is the checkpoint complete, and does quantization_config describe it?") from exc
    if not layers:
        raise BitsmithError(f"quantization_config says {method} but no packed tensors were found", where=where,
                            fix="check that the *.safetensors files are the quantized ones")
    for name, (codes, group, type_name) in layers.items():
        weight = f"{name}.weight"
        made = to_quantized(codes, group)
        result.types[weight] = type_name
        # (q - z) * s in float32, the value dequantize(made) gives too (exact layers: the tests check both)
        result.weights[weight] = codes.dequantize()
        if isinstance(made, str):
            result.requantized[weight] = made
        else:
            result.quantized[weight] = made
    weights.update(result.weights)
    return result
