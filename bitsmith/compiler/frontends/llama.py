"""Builds the IR of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) from a ModelConfig."""

from __future__ import annotations

import math

from bitsmith.compiler.config import ModelConfig, expected_weight_shapes
from bitsmith.compiler.builder import FunctionBuilder
from bitsmith.compiler.ir import Dim, Module, TensorType

SEQ = "seq"  # tokens in this step (prefill: symbolic; decode: 1)
CTX = "ctx"  # KV-cache slots, bound when the cache is allocated


def kv_cache_type(config: ModelConfig) -> TensorType:
    return TensorType((config.num_layers, 2, CTX, config.num_kv_heads, config.head_dim), "float32")


def _decoder_layer(b: FunctionBuilder, config: ModelConfig, i: int, x: str, pos: str, cache: str) -> tuple[str, str]:
    """One pre-norm block; returns (hidden [seq, hidden], cache)."""
    p = f"layers.{i}."
    d, nh, nkv = config.head_dim, config.num_heads, config.num_kv_heads
    h = b.op("rmsnorm", [x, b.weight(p + "input_layernorm.weight")], hint=p + "input_norm", eps=config.rms_norm_eps)

    def project(name: str, heads: int) -> str:
        args = [h, b.weight(p + f"self_attn.{name}_proj.weight")]
        if config.attention_bias:
            args.append(b.weight(p + f"self_attn.{name}_proj.bias"))
        flat = b.op("linear", args, hint=p + f"{name}_proj")
        return b.op("reshape", [flat], hint=p + name, shape=[-1, heads, d])  # [seq, heads, head_dim]

    q, k, v = project("q", nh), project("k", nkv), project("v", nkv)
    if config.qk_norm:
        q = b.op("rmsnorm", [q, b.weight(p + "self_attn.q_norm.weight")], hint=p + "q_norm", eps=config.rms_norm_eps)
        k = b.op("rmsnorm", [k, b.weight(p + "self_attn.k_norm.weight")], hint=p + "k_norm", eps=config.rms_norm_eps)
    rope = dict(theta=config.rope_theta, style=config.rope_style, rotary_dim=d, scaling=config.rope_scaling)
    q = b.op("rope", [q, pos], hint=p + "q_rope", **rope)
    k = b.op("rope", [k, pos], hint=p + "k_rope", **rope)
    attn, cache = b.op_multi(
        "attention", [q, k, v, pos, cache], hint=p + "attn",
        layer=i, scale=1.0 / math.sqrt(d), sliding_window=config.window(i),
    )
    attn = b.op("reshape", [attn], hint=p + "attn_flat", shape=[-1, nh * d])
    x = b.op("add", [x, b.op("linear", [attn, b.weight(p + "self_attn.o_proj.weight")], hint=p + "o_proj")],
             hint=p + "attn_residual")

    h = b.op("rmsnorm", [x, b.weight(p + "post_attention_layernorm.weight")], hint=p + "post_norm",
             eps=config.rms_norm_eps)
    gate = b.op("linear", [h, b.weight(p + "mlp.gate_proj.weight")], hint=p + "gate_proj")
    up = b.op("linear", [h, b.weight(p + "mlp.up_proj.weight")], hint=p + "up_proj")
    act = "silu" if config.hidden_act == "silu" else "gelu"
    act_attrs = {"approximate": "tanh"} if config.hidden_act == "gelu_tanh" else {}
    gated = b.op("mul", [b.op(act, [gate], hint=p + act, **act_attrs), up], hint=p + "gated")
    down = b.op("linear", [gated, b.weight(p + "mlp.down_proj.weight")], hint=p + "down_proj")
    return b.op("add", [x, down], hint=p + "mlp_residual"), cache


def build_function(name: str, seq: Dim, config: ModelConfig, weights: dict[str, TensorType]):
    b = FunctionBuilder(name, weights)
    tokens = b.input("tokens", TensorType((seq,), "int64"))
    pos = b.input("positions", TensorType((seq,), "int64"))
    cache = b.input("kv_cache", kv_cache_type(config))
    x = b.op("embedding", [b.weight("embed_tokens.weight"), tokens], hint="embed")
    for i in range(config.num_layers):
        x, cache = _decoder_layer(b, config, i, x, pos, cache)
    x = b.op("rmsnorm", [x, b.weight("norm.weight")], hint="final_norm", eps=config.rms_norm_eps)
    head = "embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    logits = b.op("linear", [x, b.weight(head)], hint="logits")
    return b.finish([logits, cache])


def build_llama_module(config: ModelConfig, weight_dtypes: dict[str, str]) -> Module:
    """The module for `config`; `weight_dtypes` gives each canonical weight's storage dtype."""
    shapes = expected_weight_shapes(config)
    weights = {name: TensorType(shape, weight_dtypes.get(name, "float32")) for name, shape in shapes.items()}
    functions = {
        "prefill": build_function("prefill", SEQ, config, weights),
        "decode": build_function("decode", 1, config, weights),
    }
    return Module(functions, weights, meta={"config": config.to_json(), "frontend": "llama"})
