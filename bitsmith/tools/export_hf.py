"""`bitsmith export --format compressed-tensors | gptq`: an artifact as an HF directory that vLLM, SGLang, TGI load."""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.hf_quant_formats import (
    CT_BITS,
    GPTQ_BITS,
    compressed_tensors_args,
    pack_compressed_tensors,
    pack_gptq,
)
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.rtn import group_params, quantize_with_params
from bitsmith.runtime.artifact import Artifact, load_artifact
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize
from bitsmith.runtime.safetensors_io import write_safetensors
from bitsmith.tools.export import (
    ExportOptions,
    ExportReport,
    TensorExport,
    dense_weights,
    quantized_weights,
)

# our model_type -> the transformers class; the IR names of these families are HF's without the "model." prefix
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
              "qwen3": "Qwen3ForCausalLM"}
TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32"}


def hf_name(ir_name: str) -> str:
    """IR weight name -> checkpoint name ("layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj.weight")."""
    return ir_name if ir_name.startswith("lm_head.") else "model." + ir_name


def hf_config(model: dict[str, Any], dtype: str, where: str, own_head: bool = False) -> dict[str, Any]:
    """config.json of a hand-written family, from the artifact's model config (which keeps rope_scaling as HF's).
    `own_head`: the artifact stores lm_head apart from the embedding (a tied GGUF whose output matrix came in
    quantized, the embedding dequantized), so the export is untied."""
    arch = model["architecture"]
    if arch not in HF_CLASSES:
        raise BitsmithError(f"architecture {arch!r} has no HF export yet", where=where,
                            fix=f"export {', '.join(HF_CLASSES)} models, or use --format gguf / onnx")
    if model.get("rope_style", "half") != "half" or model.get("layer_windows"):
        raise BitsmithError(f"{arch} with rope_style {model.get('rope_style')!r} / per-layer windows has no "
                            "exact HF config here", where=where, fix="use --format gguf")
    cfg = {"architectures": [HF_CLASSES[arch]], "model_type": arch, "vocab_size": model["vocab_size"],
           "hidden_size": model["hidden_size"], "intermediate_size": model["intermediate_size"],
           "num_hidden_layers": model["num_layers"], "num_attention_heads": model["num_heads"],
           "num_key_value_heads": model["num_kv_heads"], "head_dim": model["head_dim"],
           "rms_norm_eps": model["rms_norm_eps"], "rope_theta": model["rope_theta"],
           "rope_scaling": model.get("rope_scaling"), "max_position_embeddings": model["max_position"],
           "tie_word_embeddings": model["tie_word_embeddings"] and not own_head, "hidden_act": model["hidden_act"],
           "attention_bias": bool(model.get("attention_bias")), "mlp_bias": False,
           "bos_token_id": model.get("bos_token_id"), "eos_token_id": model.get("eos_token_id"),
           "torch_dtype": dtype, "use_cache": True}
    if arch in ("mistral", "qwen2", "qwen3"):
        cfg["sliding_window"] = model.get("sliding_window")
        if arch != "mistral":
            cfg["use_sliding_window"] = model.get("sliding_window") is not None
    return cfg


# -- per-weight conversion ------------------------------------------------------------------------------------------

def requantize(qw: QuantizedWeight, bits: tuple[int, ...], min_zero: int = 0) -> tuple[QuantizedWeight, float]:
    """The nearest form both HF formats hold (fp16 scales, integer zeros, no perm, whole groups): of (a) the same
    codes and scales with each zero point rounded to an integer (asym or min form, where the layout allows) and
    (b) RTN from `qw`'s dequantized values with integer zeros, the one with the smaller max (then mean) abs
    difference to those values; returns it and the max."""
    s = qw.scheme
    w = dequantize(qw)
    group = s.group_size
    if group != -1 and qw.in_features % group:
        group = max([g for g in (128, 64, 32, 16) if qw.in_features % g == 0] or [-1])
    near = QuantScheme(bits=s.bits if s.bits in bits else 8, group_size=group, sym=s.sym, method=s.method)
    scales, zeros = group_params(w, near)
    if zeros is not None:  # integer zero points, as the formats store them
        zeros = np.clip(np.rint(zeros.astype(np.float32)), min_zero, near.qmax).astype(np.float16)
    candidates = [quantize_with_params(w, scales, zeros, near)]
    if not s.sym and not s.super_group and qw.perm is None and group == s.group_size and near.bits == s.bits:
        # w = s*q + m = s*(q - z), z = -m/s: only z moves, by at most half a step where it lies in [0, 2^b - 1]
        z = qw.zeros.astype(np.float32) if not s.offset else -qw.group_offsets() / qw.group_scales()
        z_int = np.clip(np.rint(np.nan_to_num(z)), min_zero, s.qmax).astype(np.float16)
        candidates.append(QuantizedWeight(qw.q, qw.scales, z_int, QuantScheme(s.bits, s.group_size, False, s.method),
                                          qw.in_features))
    diffs = [np.abs(dequantize(c) - w) for c in candidates]
    best = min(range(len(candidates)), key=lambda i: (float(diffs[i].max()), float(diffs[i].mean())))  # ties: mean
    return candidates[best], float(diffs[best].max())


def _convert(artifact: Artifact, options: ExportOptions, pack: Callable[[QuantizedWeight, str], dict[str, np.ndarray]],
             bits: tuple[int, ...], target: Callable[[QuantScheme], str], report: ExportReport
             ) -> tuple[dict[str, np.ndarray], dict[str, QuantScheme]]:
    """HF tensors of every weight, and the scheme each quantized Linear (by module name) ends up with."""
    tensors: dict[str, np.ndarray] = {}
    schemes: dict[str, QuantScheme] = {}
    for name, qw in sorted(quantized_weights(artifact).items()):
        module = hf_name(name).removesuffix(".weight")
        where = f"{report.format} export, {name}"
        try:
            parts, exact, err = pack(qw, where), True, 0.0
        except BitsmithError:
            if not options.allow_requantize:
                raise
            qw, err = requantize(qw, bits, min_zero=1 if report.format == "gptq" else 0)  # GPTQ v1: z - 1 >= 0
            parts, exact = pack(qw, where), False
        tensors.update({f"{module}.{k}": v for k, v in parts.items()})
        schemes[module] = qw.scheme
        report.tensors.append(TensorExport(hf_name(name), qw.scheme.name, target(qw.scheme), exact, err))
    for name, w in sorted(dense_weights(artifact).items()):
        tensors[hf_name(name)] = np.asarray(w)
        report.tensors.append(TensorExport(hf_name(name), str(w.dtype), str(w.dtype)))
    return tensors, schemes


def _dense_linears(artifact: Artifact, schemes: dict[str, QuantScheme]) -> list[str]:
    """Module names of the Linear layers left at 16 bits (the tied head is a Linear too, in transformers)."""
    dense = [hf_name(n).removesuffix(".weight") for n, w in dense_weights(artifact).items()
             if np.ndim(w) == 2 and not n.startswith("embed_tokens")]
    return sorted(set(dense + ([] if "lm_head" in schemes else ["lm_head"])))


def _write_common(artifact: Artifact, out: Path, config: dict[str, Any], tensors: dict[str, np.ndarray],
                  report: ExportReport) -> None:
    """model.safetensors, config.json, generation_config.json and the tokenizer files."""
    out.mkdir(parents=True)
    write_safetensors(out / "model.safetensors", sorted(tensors.items()), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    model = artifact.config
    generation = {"bos_token_id": model.get("bos_token_id"), "eos_token_id": model.get("eos_token_id")}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tok = artifact.manifest.get("tokenizer")
    if not tok or tok.get("kind") != "hf":
        report.notes.append("no HF tokenizer in the artifact (llama2.c or none): copy tokenizer files in by hand")
        return
    for name in tok["files"]:
        (out / name).write_bytes((artifact.directory / name).read_bytes())
    if "tokenizer_config.json" not in tok["files"]:
        vocab = _id_to_token(out / "tokenizer.json")
        eos = (tok.get("eos_token_ids") or [None])[0]
        tcfg = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tok.get("add_bos")),
                "bos_token": vocab.get(tok.get("bos_token_id")), "eos_token": vocab.get(eos),
                "chat_template": tok.get("chat_template"), "model_max_length": model["max_position"]}
        (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


def _id_to_token(path: Path) -> dict[int, str]:
    data = json.loads(path.read_text())
    table = {i: t for t, i in (data.get("model", {}).get("vocab") or {}).items()} if isinstance(
        data.get("model", {}).get("vocab"), dict) else {}
    table.update({t["id"]: t["content"] for t in data.get("added_tokens", [])})
    return table


def _storage_dtype(tensors: dict[str, np.ndarray]) -> str:
    floats = [str(t.dtype) for n, t in tensors.items() if n.endswith(".weight") and str(t.dtype) in TORCH_DTYPES]
    return max(set(floats), key=floats.count) if floats else "float16"


# -- the two formats --------------------------------------------------------------------------------------------------

def export_compressed_tensors(artifact_dir: Path, out: Path, options: ExportOptions) -> ExportReport:
    """A compressed-tensors `pack-quantized` directory: one config_group per distinct scheme, its targets the exact
    module names (a searched mixed plan survives), 16-bit Linears under `ignore`."""
    artifact = load_artifact(artifact_dir, check_hashes=False)
    report = ExportReport("compressed-tensors", str(out))

    def target(s: QuantScheme) -> str:
        return f"pack-quantized int{s.bits} {'pc' if s.group_size == -1 else f'g{s.group_size}'}"

    tensors, schemes = _convert(artifact, options, pack_compressed_tensors, CT_BITS, target, report)
    groups: dict[str, list[str]] = {}
    for module, scheme in schemes.items():
        groups.setdefault(scheme.short_name(), []).append(module)
    by_name = {s.short_name(): s for s in schemes.values()}
    config_groups = {f"group_{i}": {"targets": sorted(mods), "weights": compressed_tensors_args(by_name[key]),
                                    "input_activations": None, "output_activations": None, "format": "pack-quantized"}
                     for i, (key, mods) in enumerate(sorted(groups.items()))}
    config = hf_config(artifact.config, _storage_dtype(tensors), str(artifact_dir),
                       own_head=any(k.startswith("lm_head.") for k in tensors))
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                     "quantization_status": "compressed", "config_groups": config_groups,
                                     "ignore": _dense_linears(artifact, schemes), "kv_cache_scheme": None,
                                     "global_compression_ratio": None}
    _write_common(artifact, out, config, tensors, report)
    report.notes.append(f"{len(config_groups)} config_group(s): "
                        + ", ".join(f"{k} x{len(v)}" for k, v in sorted(groups.items())))
    report.notes.extend(fused_scheme_notes(schemes))
    return report


# vLLM and SGLang load these projections as one fused matrix and require one scheme across it
FUSED_SETS = (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("mlp.gate_proj", "mlp.up_proj"))


def fused_scheme_notes(schemes: dict[str, QuantScheme]) -> list[str]:
    """A note per layer whose fused set (q/k/v, gate/up) mixes schemes: exact here, refused by vLLM's loader."""
    notes = []
    prefixes = sorted({m.rsplit(".", 2)[0] for m in schemes if ".layers." in m})
    for prefix in prefixes:
        for members in FUSED_SETS:
            found = {m: schemes.get(f"{prefix}.{m}") for m in members}
            names = {s.short_name() if s else "16-bit" for s in found.values()}
            if len(names) > 1:
                notes.append(f"{prefix}: {', '.join(f'{m} {s.short_name() if s else 16}' for m, s in found.items())}"
                             " differ; vLLM/SGLang fuse these and need one scheme (give them one with --scheme)")
    return notes


def export_gptq(artifact_dir: Path, out: Path, options: ExportOptions) -> ExportReport:
    """A GPTQ v1 directory (qweight/qzeros/scales/g_idx, quantize_config.json). The model-wide bits/group/sym are
    the most common scheme's; other schemes and the 16-bit Linears are GPTQModel `dynamic` per-module entries
    ("+:" / "-:" and the exact name as a regex), which GPTQModel and vLLM read; `lm_head` says it is quantized."""
    artifact = load_artifact(artifact_dir, check_hashes=False)
    report = ExportReport("gptq", str(out))

    def target(s: QuantScheme) -> str:
        return f"gptq int{s.bits} {'pc' if s.group_size == -1 else f'g{s.group_size}'}"

    tensors, schemes = _convert(artifact, options, pack_gptq, GPTQ_BITS, target, report)
    kinds = Counter((s.bits, s.group_size, s.sym) for s in schemes.values())
    if not kinds:
        raise BitsmithError("the artifact has no quantized weights", where=str(artifact_dir),
                            fix="compile with --method rtn|gptq|awq (a float model needs no GPTQ export)")
    (bits, group, sym), _ = max(sorted(kinds.items()), key=lambda kv: kv[1])
    act_order = any(qw.perm is not None for qw in quantized_weights(artifact).values())
    dynamic: dict[str, dict[str, Any]] = {f"-:^{re.escape(m)}$": {}
                                          for m in _dense_linears(artifact, schemes) if m != "lm_head"}
    for module, s in sorted(schemes.items()):
        if (s.bits, s.group_size, s.sym) != (bits, group, sym):
            dynamic[f"+:^{re.escape(module)}$"] = {"bits": s.bits, "group_size": s.group_size, "sym": s.sym}
    qcfg: dict[str, Any] = {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": bits, "group_size": group,
                            "desc_act": act_order, "sym": sym, "lm_head": "lm_head" in schemes,
                            "true_sequential": True, "static_groups": False, "damp_percent": 0.01,
                            "model_file_base_name": "model"}
    if dynamic:
        qcfg["dynamic"] = dynamic
    if len(kinds) > 1:
        report.notes.append(f"{len(kinds)} schemes: int{bits}-g{group} model-wide, {len(schemes) - kinds[(bits, group, sym)]}"
                            " module(s) as `dynamic` overrides (GPTQModel, vLLM; AutoGPTQ/optimum ignore them)")
    config = hf_config(artifact.config, _storage_dtype(tensors), str(artifact_dir),
                       own_head=any(k.startswith("lm_head.") for k in tensors))
    config["quantization_config"] = qcfg
    _write_common(artifact, out, config, tensors, report)
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    return report
