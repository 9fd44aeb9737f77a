"""What each GGUF architecture llama.cpp writes maps back to: an HF model_type, config keys and tensor names."""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.frontends.llama2c import interleaved_to_half
from bitsmith.errors import BitsmithError
from bitsmith.runtime.quant_scheme import QuantizedWeight

FIX_HF = "convert the model to a Hugging Face directory (config.json + safetensors) and compile that"


@dataclass(frozen=True)
class GgufArch:
    """How llama.cpp's converter wrote one architecture, i.e. what to undo to get the HF checkpoint back."""

    model_type: str  # the transformers model_type the file becomes
    config: dict[str, str] = field(default_factory=dict)  # "<arch>.KEY" -> HF config key, beyond COMMON_CONFIG
    blocks: dict[str, str] = field(default_factory=dict)  # blk.N.NAME -> HF suffix under model.layers.N., over BLOCKS
    defaults: dict[str, Any] = field(default_factory=dict)  # HF config values llama.cpp assumes without storing them
    permute_qk: bool = False  # q/k rows were permuted into interleaved RoPE pairs (llama.cpp's LlamaModel)
    norm_shift: float = 0.0  # every *norm.weight was stored as w + shift (Gemma's RMSNorm scales by 1 + w)
    # queries are scaled by 1/sqrt(head_dim), except by 1/sqrt(hidden / heads) in the 27B model, which llama.cpp
    # recognises by this layer count (the file stores no scale): Gemma 2 and 3's query_pre_attn_scalar
    query_scale_27b_layers: int | None = None


COMMON_CONFIG = {
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "block_count": "num_hidden_layers",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
}
GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCKS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Mixture of experts: llama.cpp stores each expert matrix stacked, [n_expert, out, in]; transformers fuses
# gate and up into one gate_up_proj [n_expert, 2 * ff, hidden] with gate first.
MOE_BLOCKS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_up_proj#0",
              "ffn_up_exps": "mlp.experts.gate_up_proj#1", "ffn_down_exps": "mlp.experts.down_proj"}
GEMMA2_NORMS = {"ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
                "post_ffw_norm": "post_feedforward_layernorm"}
EXPERTS = {"expert_count": "num_local_experts", "expert_used_count": "num_experts_per_tok"}

# GGUF architecture (general.architecture; "llama+experts" is llama with llama.expert_count > 0) -> its map.
# The README's architecture table is generated from this dict.
GGUF_ARCHS: dict[str, GgufArch] = {
    "llama": GgufArch("llama", permute_qk=True),
    "llama+experts": GgufArch("mixtral", config=EXPERTS, blocks=MOE_BLOCKS, permute_qk=True),
    "qwen2": GgufArch("qwen2", defaults={"use_sliding_window": False}),
    "qwen3": GgufArch("qwen3", defaults={"use_sliding_window": False}),
    "qwen3moe": GgufArch("qwen3_moe", config={**EXPERTS, "expert_feed_forward_length": "moe_intermediate_size"},
                         blocks=MOE_BLOCKS, defaults={"norm_topk_prob": True, "decoder_sparse_step": 1,
                                                      "mlp_only_layers": [], "use_sliding_window": False}),
    "gemma": GgufArch("gemma", norm_shift=1.0),
    "gemma2": GgufArch("gemma2", config={"attn_logit_softcapping": "attn_logit_softcapping",
                                         "final_logit_softcapping": "final_logit_softcapping",
                                         "attention.sliding_window": "sliding_window"},
                       blocks=GEMMA2_NORMS, norm_shift=1.0, query_scale_27b_layers=46),
    "gemma3": GgufArch("gemma3_text", config={"final_logit_softcapping": "final_logit_softcapping",
                                              "attention.sliding_window": "sliding_window"},
                       blocks=GEMMA2_NORMS, norm_shift=1.0, query_scale_27b_layers=62),
    "phi3": GgufArch("phi3", config={"rope.scaling.original_context_length": "original_max_position_embeddings",
                                     "attention.sliding_window": "sliding_window"},
                     blocks={"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}),
}
# ggml tensor types that load (dequantized to float32 by the gguf package), each checked against llama.cpp's own
# output on the same file (tests/compiler/frontends/test_gguf_types.py); any other is refused, naming it
GGUF_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
              "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0")
# ggml types with no exact scheme (they load dequantized to float32, then the plan decides) -> the nearest exact
# type: the same bits and block size where one exists (IQ4_NL/MXFP4: a 16-value codebook over blocks of 32), else
# the K-quant of the same bits per weight
NEAREST_EXACT = {"IQ4_NL": "Q4_0", "MXFP4": "Q4_0", "IQ4_XS": "Q4_K", "IQ3_S": "Q3_K", "IQ3_XXS": "Q3_K",
                 "IQ2_S": "Q2_K", "IQ2_XS": "Q2_K", "IQ2_XXS": "Q2_K", "IQ1_S": "Q2_K", "IQ1_M": "Q2_K",
                 "TQ1_0": "Q2_K", "TQ2_0": "Q2_K"}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def arch_key(meta: dict[str, Any], path: Path) -> str:
    """The GGUF_ARCHS key of a file, or a BitsmithError naming its unsupported architecture."""
    arch = meta.get("general.architecture")
    if arch == "llama" and int(meta.get("llama.expert_count", 0) or 0) > 0:
        return "llama+experts"
    if arch not in GGUF_ARCHS:
        supported = ", ".join(sorted(k for k in GGUF_ARCHS if "+" not in k))
        raise BitsmithError(f"GGUF architecture {arch!r} is not supported (supported: {supported})",
                            where=str(path), fix=FIX_HF)
    return arch


def _f32(value: Any) -> Any:
    """A float32 metadata value as its shortest decimal (1e-5, not 9.999999747378752e-06)."""
    return float(str(np.float32(value))) if isinstance(value, float) else value


def hf_config(key: str, meta: dict[str, Any], tensors: dict[str, tuple[int, ...]], path: Path) -> dict[str, Any]:
    """An HF config.json dict from the metadata (`tensors`: GGUF name -> (out, in) shape)."""
    spec, arch = GGUF_ARCHS[key], meta["general.architecture"]
    cfg: dict[str, Any] = {"model_type": spec.model_type, **spec.defaults}
    for gguf_key, hf_key in {**COMMON_CONFIG, **spec.config}.items():
        if f"{arch}.{gguf_key}" in meta:
            cfg[hf_key] = _f32(meta[f"{arch}.{gguf_key}"])
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if required not in cfg:
            raise BitsmithError(f"GGUF metadata lacks the {arch} key for {required}", where=str(path),
                                fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py")
    heads = cfg["num_attention_heads"]
    cfg.setdefault("num_key_value_heads", heads)
    head_dim = cfg.setdefault("head_dim", cfg["hidden_size"] // heads)
    tokens = meta.get("tokenizer.ggml.tokens")
    cfg["vocab_size"] = len(tokens) if tokens is not None else tensors["token_embd.weight"][0]
    cfg["tie_word_embeddings"] = "output.weight" not in tensors
    for name, gguf_name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                            ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_name}" in meta:
            cfg[name] = int(meta[f"tokenizer.ggml.{gguf_name}"])
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    if key == "phi3":
        cfg["partial_rotary_factor"] = (int(rope_dims) if rope_dims is not None else head_dim) / head_dim
        cfg["sliding_window"] = cfg.get("sliding_window") or None  # 0 marks "none" (Phi-4)
        if "rope_factors_long.weight" in tensors:
            raise BitsmithError("Phi-3 LongRoPE (rope_factors_long/short) is not supported for GGUF input",
                                where=str(path), fix=FIX_HF)
    elif rope_dims is not None and int(rope_dims) != head_dim:
        raise BitsmithError(f"partial rotary embedding (rope.dimension_count {rope_dims}, head_dim {head_dim})",
                            where=str(path), fix=FIX_HF)
    if spec.query_scale_27b_layers is not None:
        is_27b = cfg["num_hidden_layers"] == spec.query_scale_27b_layers
        cfg["query_pre_attn_scalar"] = cfg["hidden_size"] // heads if is_27b else head_dim
    scaling = _rope_scaling(arch, meta, path)
    if key == "gemma3":  # RoPE per layer kind: local layers have their own base (10000 unless the file says)
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta", 1000000.0), **(scaling or {})}
        local = {"rope_type": "default", "rope_theta": _f32(meta.get(f"{arch}.rope.freq_base_swa", 10000.0))}
        cfg["rope_parameters"] = {"sliding_attention": local, "full_attention": full}
        if not cfg.get("sliding_window"):  # the converter omits the window when no layer slides
            cfg["layer_types"] = ["full_attention"] * cfg["num_hidden_layers"]
    elif scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _rope_scaling(arch: str, meta: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """None or linear scaling; other schemes (yarn, llama3 rope_freqs) are not mapped yet."""
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        factor = meta.get(f"{arch}.rope.scaling.factor")
        if factor is None:
            raise BitsmithError(f"GGUF metadata lacks {arch + '.rope.scaling.factor'!r}", where=str(path),
                                fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        return {"rope_type": "linear", "factor": _f32(factor)}
    raise BitsmithError(f"RoPE scaling {kind!r} is not supported for GGUF input", where=str(path), fix=FIX_HF)


def hf_name(key: str, gguf_name: str, path: Path) -> tuple[str, int | None]:
    """(HF state-dict name, half of a fused gate_up tensor or None) of a GGUF tensor name."""
    base, _, kind = gguf_name.rpartition(".")
    if base in GLOBALS and kind == "weight":
        return f"{GLOBALS[base]}.weight", None
    match = _BLOCK.fullmatch(gguf_name)
    blocks = {**BLOCKS, **GGUF_ARCHS[key].blocks}
    if match and match.group(2) in blocks:
        target, _, half = blocks[match.group(2)].partition("#")
        suffix = "" if target.startswith("mlp.experts.") else f".{match.group(3)}"
        return f"model.layers.{match.group(1)}.{target}{suffix}", int(half) if half else None
    raise BitsmithError(f"GGUF tensor {gguf_name!r} has no mapping to a {GGUF_ARCHS[key].model_type} weight",
                        where=str(path), fix=FIX_HF)


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, path: Path) -> dict[str, Any]:
    """The llama3 rope_scaling dict behind llama.cpp's rope_freqs.weight (one divisor per frequency pair).

    The converter stores only the divisors: 1 for short wavelengths, `factor` for long ones and, in between,
    1 / ((1 - s) / factor + s) with s = orig / wavelen / (high - low) - low / (high - low), linear in 1 / wavelen.
    A line fitted through the in-between pairs gives the two coefficients; low_freq_factor = 1 (Meta's value) fixes
    the rest. The result is checked by recomputing every divisor.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    factor = float(factors.max())
    inv_wavelen = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * np.pi)
    band = (factors > 1 + 1e-6) & (factors < factor * (1 - 1e-6))
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # Meta's Llama 3.1 values, when the band is too narrow
    if band.sum() >= 2 and factor > 1:
        smooth = (1.0 / factors[band] - 1.0 / factor) / (1.0 - 1.0 / factor)
        a, b = np.polyfit(inv_wavelen[band], smooth, 1)
        if b < 0:
            high = 1.0 - 1.0 / b
            scaling.update(high_freq_factor=_round(high), original_max_position_embeddings=int(round(-a / b)))
    if factors.shape != inv_wavelen.shape or not np.allclose(_llama3_factors(scaling, inv_wavelen), factors,
                                                            rtol=1e-4, atol=0):
        raise BitsmithError("rope_freqs.weight does not follow llama3 RoPE scaling", where=str(path), fix=FIX_HF)
    return {**scaling, "factor": _round(factor)}


def _round(x: float) -> float:
    return float(f"{x:.6g}")


def _llama3_factors(scaling: dict[str, Any], inv_wavelen: np.ndarray) -> np.ndarray:
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    orig, factor = scaling["original_max_position_embeddings"], scaling["factor"]
    smooth = np.clip((orig * inv_wavelen - low) / (high - low), 0.0, 1.0)
    return 1.0 / ((1.0 - smooth) / factor + smooth)


def qk_row_order(key: str, gguf_name: str, rows: int, cfg: dict[str, Any]) -> np.ndarray | None:
    """int64 [rows]: the HF row each stored row of a permuted q/k weight goes to (row i of the HF weight is stored
    row order[i]), or None when the converter did not reorder this tensor's rows."""
    if not (GGUF_ARCHS[key].permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_k.weight"))):
        return None
    heads = cfg["num_attention_heads"] if ".attn_q." in gguf_name else cfg["num_key_value_heads"]
    return interleaved_to_half(np.arange(rows).reshape(rows, 1), heads)[:, 0]


def undo_conversion_codes(key: str, gguf_name: str, qw: QuantizedWeight, cfg: dict[str, Any]) -> QuantizedWeight | None:
    """undo_conversion on quantized codes: a row permutation moves codes, scales and offsets along (exact); a change
    to the values (Gemma's norm shift) has no exact form, so None (the caller keeps the dequantized float)."""
    if GGUF_ARCHS[key].norm_shift and gguf_name.endswith("norm.weight"):
        return None
    order = qk_row_order(key, gguf_name, qw.out_features, cfg)
    if order is None:
        return qw
    rows = {k: None if a is None else np.ascontiguousarray(a[order])
            for k, a in (("zeros", qw.zeros), ("super_scales", qw.super_scales), ("super_zeros", qw.super_zeros))}
    return replace(qw, q=np.ascontiguousarray(qw.q[order]), scales=np.ascontiguousarray(qw.scales[order]), **rows)


def undo_conversion(key: str, gguf_name: str, w: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
    """Undo what llama.cpp's converter did to one dequantized tensor (in HF (out, in) layout)."""
    spec = GGUF_ARCHS[key]
    if spec.norm_shift and gguf_name.endswith("norm.weight"):
        return w - np.float32(spec.norm_shift)
    if spec.permute_qk and gguf_name.endswith((".attn_q.weight", ".attn_k.weight")):
        heads = cfg["num_attention_heads"] if ".attn_q." in gguf_name else cfg["num_key_value_heads"]
        return interleaved_to_half(w, heads)
    return w
