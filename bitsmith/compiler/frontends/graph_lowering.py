"""What the graph frontends (torch.export, ONNX) share: batch-aware lowering into the IR builder, finishing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.builder import FunctionBuilder
from bitsmith.compiler.ir import Function, Module, TensorType
from bitsmith.errors import BitsmithError

SEQ, CTX = "seq", "ctx"
CONST_LIMIT = 4096  # buffers up to this many elements (rotary inv_freq) become `const` nodes, not weights



def finish_module(prefill: Function, weights: dict[str, np.ndarray], meta: dict[str, Any]) -> tuple[Module, dict]:
    """The traced module: `prefill` alone, as lowered (the pipeline's canonicalize phase fuses it to LLM-level
    ops and derives `decode`) with the weights it reads: the model's dtype is that of those. Shared with ONNX."""
    read = {n.attrs["name"] for n in dead_code_elimination(prefill).nodes if n.op == "weight"}
    weights = {k: v for k, v in weights.items() if k in read}
    types = {k: TensorType(tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
    return Module({"prefill": prefill}, types, meta), weights


def weight_name(target: str) -> str:
    """Canonical weight name: without the "model." prefix(es) of HF (and of a wrapper module named `model`)."""
    while target.startswith("model."):
        target = target[len("model."):]
    return target


def to_numpy(tensor: Any) -> np.ndarray:
    import torch  # heavy: torch

    tensor = tensor.detach().cpu().contiguous()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # heavy: ml_dtypes

        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.numpy()


@dataclass
class Val:
    """A lowered tensor: its IR value and whether the traced tensor had the (dropped) leading batch dim."""

    name: str
    batched: bool


class GraphLowering:
    """What both graph frontends share: the IR builder, entry inputs, batch-aware axes and the attention op."""

    where = ""

    def begin(self, weights: dict[str, np.ndarray], layers: int, heads: set[tuple[int, int]]) -> None:
        if len(heads) > 1:
            raise BitsmithError(f"attention layers differ in (kv heads, head dim): {sorted(heads)}", where=self.where,
                                fix="one KV cache needs the same kv heads and head dim in every layer")
        (kv_heads, head_dim), = heads or {(1, 1)}
        self.b = FunctionBuilder("prefill", {k: TensorType(tuple(v.shape), str(v.dtype)) for k, v in weights.items()})
        self.tokens = self.b.input("tokens", TensorType((SEQ,), "int64"))
        self.positions = self.b.input("positions", TensorType((SEQ,), "int64"))
        self.cache = self.b.input("kv_cache", TensorType((layers, 2, CTX, kv_heads, head_dim), "float32"))
        self.layer = 0
        self.meta = {"num_layers": layers, "num_kv_heads": kv_heads, "head_dim": head_dim}

    def end(self, out: Any) -> tuple[Function, dict[str, Any]]:
        if not isinstance(out, Val) or not out.batched or self.b.type_of(out.name).rank != 2:
            raise BitsmithError("the first output is not logits [batch, seq, vocab]", where=self.where)
        return self.b.finish([out.name, self.cache]), {**self.meta, "vocab_size": self.b.type_of(out.name).shape[-1]}

    def rank(self, x: Val) -> int:
        """Rank of the traced tensor (batch included)."""
        return self.b.type_of(x.name).rank + x.batched

    def locate(self, at: Any) -> str:
        """Where a node came from, for error messages (the model source line, the ONNX node)."""
        return f"{self.where}: {at}"

    def axis(self, x: Val, dim: int, at: Any) -> int:
        """The IR axis of traced axis `dim` of x (batch dropped); `at` names the node on error."""
        dim %= self.rank(x)
        if x.batched and dim == 0:
            raise BitsmithError("an op works along the batch dimension", where=self.locate(at),
                                fix="batch is 1 in the trace; only per-sequence ops are supported")
        return dim - x.batched

    def const(self, value: Any, dtype: str) -> str:
        return self.b.op("const", [], hint="const", value=np.asarray(value).tolist(), dtype=dtype)

    def unbatch(self, x: Val) -> str:
        """An unbatched operand as wide as a batched one drops its leading 1 so the two still broadcast."""
        return self.b.op("reshape", [x.name], hint="unbatch", shape=list(self.b.type_of(x.name).shape[1:]))

    def attention(self, q: Val, k: Val, v: Val, scale: float, window: int | None, hint: str,
                  softcap: float | None = None) -> Val:
        # traced [1, heads, seq, d] -> IR [heads, seq, d] -> the attention op's [seq, heads, d], and back
        t = [self.b.op("transpose", [x.name], hint=hint + ".in", perm=[1, 0, 2]) for x in (q, k, v)]
        capped = {"softcap": float(softcap)} if softcap else {}  # (absent when off: older IR reads the same)
        out, self.cache = self.b.op_multi("attention", t + [self.positions, self.cache], hint=hint, layer=self.layer,
                                          scale=float(scale), sliding_window=window, **capped)
        self.layer += 1
        return Val(self.b.op("transpose", [out], hint=hint, perm=[1, 0, 2]), True)

