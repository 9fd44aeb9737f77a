"""HF attention as one traced op: a torch custom op `bitsmith::attention` registered as a transformers attention implementation."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

NAME = "bitsmith"  # the attention implementation (and mask function) name registered with transformers
_registered = False
SCHEMA = "(Tensor q, Tensor k, Tensor v, float scale, int window, float softcap) -> Tensor"


def _define_op() -> None:
    """bitsmith::attention(q [b, h, s, d], k/v [b, kv, s, d], scale, window, softcap) -> [b, h, s, d], causal.

    window 0 means none (a token sees every earlier one), else a token at p sees (p - window, p];
    softcap 0 means none, else scores = softcap * tanh(scale * q.k / softcap). The eager body is the
    definition; torch.export keeps the call as one node whose scalar arguments are the IR attrs.
    """
    import torch  # heavy: torch

    # (the schema is spelled out: this module's annotations are strings, which custom_op cannot resolve here)
    @torch.library.custom_op("bitsmith::attention", mutates_args=(), schema=SCHEMA)
    def attention(q, k, v, scale, window, softcap):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * scale  # [b, h, s, s]
        if softcap:
            scores = torch.tanh(scores / softcap) * softcap
        pos = torch.arange(q.shape[2], device=q.device)
        visible = pos[None, :] <= pos[:, None]
        if window:
            visible &= pos[None, :] > pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)

    @attention.register_fake
    def _(q, k, v, scale, window, softcap):
        return torch.empty_like(q)


def _hf_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                  scaling: float | None = None, sliding_window: int | None = None, softcap: float | None = None,
                  **kwargs: Any) -> tuple[Any, None]:
    """The transformers attention-function signature; the mask is ignored (the op is causal by definition)."""
    import torch  # heavy: torch

    if not getattr(module, "is_causal", True):
        from bitsmith.errors import BitsmithError

        raise BitsmithError(f"{type(module).__name__} is not causal", where="hf attention",
                            fix="only causal decoders can run with a KV cache")
    sinks = [k for k in ("s_aux", "sinks") if kwargs.get(k) is not None]
    if sinks:  # (gpt-oss) a learned logit every softmax row includes: the IR attention op has none
        from bitsmith.errors import BitsmithError

        raise BitsmithError(f"{type(module).__name__} uses attention sinks ({sinks[0]})", where="hf attention",
                            fix="attention sinks are not supported yet")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.bitsmith.attention(query, key, value, float(scale), int(sliding_window or 0), float(softcap or 0.0))
    return out.transpose(1, 2).contiguous(), None  # [b, s, h, d], as the HF attention functions return


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None  # the mask is implied by the op (causal, its window): no mask subgraph in the trace


def register() -> None:
    """Define the custom op and register it with transformers (once per process)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface  # heavy: torch
    from transformers.masking_utils import AttentionMaskInterface  # heavy: torch

    _define_op()
    AttentionInterface.register(NAME, _hf_attention)
    AttentionMaskInterface.register(NAME, _no_mask)
    _registered = True


@contextlib.contextmanager
def traced_attention(model: Any) -> Iterator[None]:
    """While active, an HF model's attention runs as `bitsmith::attention`; other modules are left as they are."""
    saved = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if saved is None or not hasattr(model, "set_attn_implementation"):
        yield
        return
    register()
    model.set_attn_implementation(NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(saved)


def attention_attrs(node: Any) -> tuple[float, int | None, float | None]:
    """(scale, sliding window or None, softcap or None) of a traced bitsmith::attention node."""
    scale, window, softcap = node.args[3:6]
    return float(scale), int(window) or None, float(softcap) or None


def is_attention(node: Any) -> bool:
    target = getattr(node, "target", None)
    return getattr(node, "op", "") == "call_function" and getattr(target, "namespace", "") == "bitsmith" and \
        getattr(getattr(target, "overloadpacket", None), "__name__", "") == "attention"
