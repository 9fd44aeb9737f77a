"""Model configuration (frozen, JSON-serialisable) shared by every Llama-family frontend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from bitsmith.errors import BitsmithError

# Canonical weight names (HF layout without the "model." prefix); every frontend emits these.
#   embed_tokens.weight                          [vocab, hidden]
#   layers.{i}.input_layernorm.weight            [hidden]
#   layers.{i}.self_attn.{q,k,v}_proj.weight     [heads*head_dim, hidden]   (+ .bias for Qwen2)
#   layers.{i}.self_attn.{q,k}_norm.weight       [head_dim]                 (Qwen3)
#   layers.{i}.self_attn.o_proj.weight           [hidden, heads*head_dim]
#   layers.{i}.post_attention_layernorm.weight   [hidden]
#   layers.{i}.mlp.{gate,up}_proj.weight         [intermediate, hidden]
#   layers.{i}.mlp.down_proj.weight              [hidden, intermediate]
#   norm.weight                                  [hidden]
#   lm_head.weight                               [vocab, hidden]            (absent when tied)

ROPE_STYLES = ("half", "interleaved")  # HF rotate_half pairs (i, i+d/2) vs llama2.c pairs (2i, 2i+1)


@dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a decoder-only Llama-family transformer."""

    architecture: str  # "llama", "mistral", "qwen2", "qwen3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_style: str = "half"
    rope_scaling: dict[str, Any] | None = None
    max_position: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    hidden_act: str = "silu"
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # per layer: its sliding window (None: global); empty: every layer has `sliding_window` (Qwen2 windows only
    # the layers from max_window_layers on, as config.json's layer_types says)
    layer_windows: tuple[int | None, ...] = ()

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer` (None: global attention)."""
        return self.layer_windows[layer] if self.layer_windows else self.sliding_window

    def __post_init__(self) -> None:
        if self.rope_style not in ROPE_STYLES:
            raise BitsmithError(f"unknown rope_style {self.rope_style!r}", fix=f"use one of {ROPE_STYLES}")
        if self.num_heads % self.num_kv_heads:
            raise BitsmithError(
                f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}",
                fix="check the model's config.json",
            )
        if self.hidden_act not in ("silu", "gelu", "gelu_tanh"):
            raise BitsmithError(f"unsupported hidden_act {self.hidden_act!r}", fix="use silu or gelu")

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["layer_windows"] = list(self.layer_windows)  # as JSON gives it back: a manifest round-trips equal
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise BitsmithError(f"model config has unknown fields {sorted(unknown)}", fix="rebuild the artifact")
        return cls(**data)


def weight_names(config: ModelConfig) -> list[str]:
    """Every canonical weight name the config implies, in model order."""
    names = ["embed_tokens.weight"]
    for i in range(config.num_layers):
        p = f"layers.{i}."
        names.append(p + "input_layernorm.weight")
        for proj in ("q", "k", "v"):
            names.append(p + f"self_attn.{proj}_proj.weight")
            if config.attention_bias:
                names.append(p + f"self_attn.{proj}_proj.bias")
        if config.qk_norm:
            names += [p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"]
        names.append(p + "self_attn.o_proj.weight")
        names.append(p + "post_attention_layernorm.weight")
        names += [p + f"mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    names.append("norm.weight")
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical weight, used by frontends to validate what they loaded."""
    h, d, ff = config.hidden_size, config.head_dim, config.intermediate_size
    q_out, kv_out = config.num_heads * d, config.num_kv_heads * d
    by_suffix = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q_out, h),
        "self_attn.k_proj.weight": (kv_out, h),
        "self_attn.v_proj.weight": (kv_out, h),
        "self_attn.q_proj.bias": (q_out,),
        "self_attn.k_proj.bias": (kv_out,),
        "self_attn.v_proj.bias": (kv_out,),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "self_attn.o_proj.weight": (h, q_out),
        "mlp.gate_proj.weight": (ff, h),
        "mlp.up_proj.weight": (ff, h),
        "mlp.down_proj.weight": (h, ff),
    }
    shapes = {}
    for name in weight_names(config):
        if name.startswith("layers."):
            shapes[name] = by_suffix[name.split(".", 2)[2]]
        elif name == "norm.weight":
            shapes[name] = (h,)
        else:  # embed_tokens / lm_head
            shapes[name] = (config.vocab_size, h)
    return shapes
