"""Tiny random configs (2 layers, hidden 64) of the Hugging Face decoder families bitsmith takes, from transformers'
own config classes: the one list the per-family tests, the GGUF tests and the benches draw from."""

from __future__ import annotations

from typing import Any, Callable

COMMON = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
GQA = dict(num_key_value_heads=2)


def _llama3(t):
    return t.LlamaConfig(**COMMON, **GQA, head_dim=16, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 32})


def _gpt2(t):
    return t.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=1,
                        eos_token_id=2)


# family -> config factory (taking the transformers module); the comment says what the family exercises
ZOO: dict[str, Callable[[Any], Any]] = {
    "llama": lambda t: t.LlamaConfig(**COMMON, **GQA, head_dim=16),
    "llama3": _llama3,  # llama3 rope scaling
    "mistral": lambda t: t.MistralConfig(**COMMON, **GQA, sliding_window=None),
    "qwen2": lambda t: t.Qwen2Config(**COMMON, **GQA),  # q/k/v biases
    "qwen3": lambda t: t.Qwen3Config(**COMMON, **GQA, head_dim=16),  # q/k norm over heads
    "gemma": lambda t: t.GemmaConfig(**COMMON, **GQA, head_dim=16),  # 1 + w norms, embedding scale, gelu-tanh
    "gemma2": lambda t: t.Gemma2Config(**COMMON, **GQA, head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                       attn_logit_softcapping=3.0, final_logit_softcapping=5.0),
    "gemma3": lambda t: t.Gemma3TextConfig(**COMMON, **GQA, head_dim=16, sliding_window=4),
    "phi": lambda t: t.PhiConfig(**COMMON, partial_rotary_factor=0.5),  # parallel block, biases, partial rotary
    "phi3": lambda t: t.Phi3Config(**COMMON, **GQA),  # fused qkv and gate/up
    "gpt_neox": lambda t: t.GPTNeoXConfig(**COMMON, rotary_pct=0.5, hidden_act="gelu"),
    "stablelm": lambda t: t.StableLmConfig(**COMMON, **GQA, partial_rotary_factor=0.25),
    "starcoder2": lambda t: t.Starcoder2Config(**COMMON, **GQA, sliding_window=None),
    "granite": lambda t: t.GraniteConfig(**COMMON, **GQA, embedding_multiplier=2.0, attention_multiplier=0.2,
                                         residual_multiplier=0.5, logits_scaling=4.0),
    "smollm3": lambda t: t.SmolLM3Config(**COMMON, **GQA),  # no-rope layers
    "olmo2": lambda t: t.Olmo2Config(**COMMON, **GQA),  # q/k norm over the whole projection
    "gpt2": _gpt2,  # Conv1D, learned positions, layernorm with bias, gelu-tanh
    "mixtral": lambda t: t.MixtralConfig(**COMMON, **GQA, num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": lambda t: t.Qwen3MoeConfig(**COMMON, **GQA, head_dim=16, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=32, decoder_sparse_step=1, norm_topk_prob=True),
    "olmoe": lambda t: t.OlmoeConfig(**COMMON, **GQA, num_experts=4, num_experts_per_tok=2),
}
MOE = ("mixtral", "qwen3_moe", "olmoe")


def zoo_config(family: str, **overrides: Any):
    import transformers

    cfg = ZOO[family](transformers)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def randomize_vectors(model, seed: int = 3) -> None:
    """Norm weights and biases start as ones/zeros; perturb them so a wrong mapping cannot hide."""
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def zoo_model(family: str, seed: int = 0, **overrides: Any):
    """A random fp32 model of the family in eval mode, its 1-d parameters perturbed."""
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(zoo_config(family, **overrides), dtype=torch.float32).eval()
    randomize_vectors(model, seed + 3)
    return model
