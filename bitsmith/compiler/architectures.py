"""The architectures bitsmith takes, by input format, and what each gets: the one registry the README's table
and `bitsmith architectures` print, and the per-family tests (tests/compiler/test_families.py) check."""

from __future__ import annotations

from dataclasses import dataclass

from bitsmith.compiler.frontends.gguf_arch import GGUF_ARCHS
from bitsmith.compiler.frontends.hf import HAND_WRITTEN


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json's model_type
    name: str
    exercises: str  # what of the IR it needs beyond a plain Llama block
    moe: bool = False
    cuda: bool = True  # every kernel it lowers to is one the CUDA target builds


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("llama", "Llama 2 / 3.x", "GQA; llama3 RoPE scaling"),
    Architecture("mistral", "Mistral", "sliding window"),
    Architecture("qwen2", "Qwen2 / 2.5", "q/k/v biases"),
    Architecture("qwen3", "Qwen3", "q/k RMSNorm over each head"),
    Architecture("gemma", "Gemma", "(1 + w) norms, embedding scale, gelu-tanh"),
    Architecture("gemma2", "Gemma 2", "attention and final logit soft-capping, alternating sliding windows, "
                                      "query pre-scaling, sandwich norms"),
    Architecture("gemma3_text", "Gemma 3 (text)", "q/k norms, sliding windows, per-layer RoPE base"),
    Architecture("phi", "Phi-1 / 2", "parallel block, biases, partial rotary"),
    Architecture("phi3", "Phi-3 / 3.5 / 4-mini", "fused qkv and gate/up projections"),
    Architecture("gpt_neox", "GPT-NeoX / Pythia", "per-head fused qkv, partial rotary, layernorm with bias"),
    Architecture("stablelm", "StableLM", "partial rotary, layernorm"),
    Architecture("starcoder2", "StarCoder2", "biases, layernorm, gelu-tanh"),
    Architecture("granite", "Granite", "embedding, residual, attention and logit multipliers"),
    Architecture("smollm3", "SmolLM3", "layers without RoPE"),
    Architecture("olmo2", "OLMo 2", "q/k RMSNorm over the whole projection, post-norms"),
    Architecture("gpt2", "GPT-2", "Conv1D weights, learned positions, layernorm with bias, gelu-tanh"),
    Architecture("mixtral", "Mixtral", "top-2 of softmax router, renormalised", moe=True, cuda=False),
    Architecture("qwen3_moe", "Qwen3-MoE", "top-k of softmax router, optional renormalisation", moe=True, cuda=False),
    Architecture("olmoe", "OLMoE", "top-k of softmax router, q/k norms", moe=True, cuda=False),
)
BY_MODEL_TYPE = {a.model_type: a for a in ARCHITECTURES}


def hf_route(model_type: str) -> str:
    """How an HF directory of this model_type is read: a hand-written mapping or the traced transformers model."""
    return "hand-written" if model_type in HAND_WRITTEN else "torch.export"


def gguf_names(model_type: str) -> list[str]:
    """The GGUF `general.architecture` values that load as this model_type."""
    return sorted(key for key, arch in GGUF_ARCHS.items() if arch.model_type == model_type)


def _gguf_label(key: str) -> str:
    """A GGUF_ARCHS key as a user sees the file: `llama+experts` is `llama` with llama.expert_count > 0."""
    arch, _, extra = key.partition("+")
    return f"`{arch}` with {arch}.expert_count > 0" if extra == "experts" else f"`{arch}`"


def support_table() -> str:
    """The Markdown table of ARCHITECTURES (the README's copy must equal it: a test checks)."""
    rows = ["| architecture | HF `model_type` | HF directory | GGUF `general.architecture` | quantized | host kernels "
            "| CUDA kernels | serving | beyond a Llama block |",
            "|---|---|---|---|---|---|---|---|---|"]
    for a in ARCHITECTURES:
        gguf = ", ".join(_gguf_label(g) for g in gguf_names(a.model_type)) or "no"
        quant = "RTN, GPTQ (experts: per expert; AWQ refused)" if a.moe else "RTN, GPTQ, AWQ"
        rows.append(f"| {a.name} | `{a.model_type}` | {hf_route(a.model_type)} | {gguf} | {quant} | yes | "
                    f"{'yes' if a.cuda else 'no'} | yes | {a.exercises} |")
    return "\n".join(rows)
