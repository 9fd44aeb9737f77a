"""torch.export frontend: trace a causal LM (any nn.Module taking token ids) and lower its ATen graph to the IR."""

from __future__ import annotations

import inspect
import math
import operator
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.frontends.base import LoadedModel, require_path, sha256_file
from bitsmith.compiler.frontends.graph_lowering import (CONST_LIMIT, SEQ, GraphLowering, Val, finish_module,
                                                        to_numpy, weight_name)
from bitsmith.compiler.frontends.hf_attention import attention_attrs, is_attention, traced_attention
from bitsmith.compiler.frontends.hf_files import hf_side_files, read_json, rope_settings
from bitsmith.compiler.frontends.aten_layout import LayoutLowering
from bitsmith.compiler.frontends.aten_layout import packet as _packet
from bitsmith.compiler.frontends.aten_layout import source_line as _source_line
from bitsmith.compiler.frontends.hf_moe import MoeLowering, inplace_as_values, traceable_experts
from bitsmith.compiler.ir import Function, Module
from bitsmith.errors import BitsmithError

UNARY = ("silu", "sigmoid", "tanh", "neg", "cos", "sin", "exp", "sqrt", "rsqrt")
IDENTITY = ("alias", "clone", "contiguous", "detach", "dropout", "lift_fresh_copy", "type_as")
RESHAPE = ("view", "reshape", "_unsafe_view", "unsqueeze", "squeeze", "flatten", "view_as", "reshape_as")
BINARY = {"add": "add", "sub": "sub", "rsub": "sub", "mul": "mul", "div": "div", "matmul": "matmul", "bmm": "matmul"}


class _AtenLowering(LayoutLowering, MoeLowering, GraphLowering):
    """Lowers the live part of an exported program into the IR `prefill` function, batch dim dropped."""

    def __init__(self, ep: Any, model: Any):
        self.ep, self.model = ep, model
        sig = ep.graph_signature
        self.state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers, **sig.inputs_to_lifted_tensor_constants}
        self.nodes = list(ep.graph.nodes)
        self.user = [n for n in self.nodes if n.op == "placeholder" and n.name not in self.state]
        self.seq_expr = self.user[0].meta["val"].shape[1].node.expr  # input_ids [1, seq]
        self.sites = [n for n in self.nodes if _packet(n) == "scaled_dot_product_attention" or is_attention(n)]
        self.v: dict[Any, Any] = {}
        self.weights: dict[str, np.ndarray] = {}
        self.consts: dict[str, np.ndarray] = {}
        self.merged: set[str] = set()  # IR values whose leading dim is the traced batch (of 1) merged with seq
        self.right_operands: set = set()  # weight placeholders stored transposed for mm/addmm (Conv1D)

    # ------------------------------------------------------------------ which nodes to lower

    @staticmethod
    def strip_repeat(node: Any) -> Any:
        """GQA's repeat_kv (unsqueeze(2) -> expand -> reshape) back to the kv-headed tensor."""
        if _packet(node) in ("reshape", "view", "_unsafe_view"):
            exp = node.args[0]
            if _packet(exp) == "expand" and _packet(exp.args[0]) == "unsqueeze" and exp.args[0].args[1] == 2:
                return exp.args[0].args[0]
        return node

    def _deps(self, node: Any) -> list[Any]:
        if node in self.sites:  # the mask argument is dropped: the IR attention op is causal by definition
            return [node.args[0], self.strip_repeat(node.args[1]), self.strip_repeat(node.args[2])]
        return list(node.all_input_nodes)

    def _live(self, roots: list[Any]) -> set:
        live, stack = set(), list(roots)
        while stack:
            node = stack.pop()
            if node not in live:
                live.add(node)
                stack.extend(self._deps(node))
        return live

    # ------------------------------------------------------------------ helpers

    def dims(self, node: Any, batched: bool) -> list:
        """IR dims of the node's traced shape: batch dropped, the token dim named `seq`."""
        out = []
        for d in list(node.meta["val"].shape)[1 if batched else 0:]:
            expr = d if isinstance(d, int) else d.node.expr
            if not isinstance(expr, int) and expr == self.seq_expr:
                out.append(SEQ)
            elif isinstance(expr, int) or expr.is_number:
                out.append(int(expr))
            else:
                raise BitsmithError(f"dimension {d} is neither static nor the token count", where=_source_line(node),
                                    fix="only the token dimension may be dynamic")
        return out

    def arg(self, node: Any, i: int, name: str, default: Any = None) -> Any:
        a = node.args[i] if i < len(node.args) else node.kwargs.get(name, default)
        if isinstance(a, (list, tuple)):
            return [self.v[x] if hasattr(x, "meta") and hasattr(x, "op") else x for x in a]
        return self.v[a] if hasattr(a, "meta") and hasattr(a, "op") else a

    def locate(self, at: Any) -> str:
        return _source_line(at)

    def hint(self, node: Any) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path = weight_name(list(stack.values())[-1][0]) if stack else ""
        return f"{path}.{_packet(node)}" if path else node.name

    def emit(self, node: Any, op: str, inputs: list[str], batched: bool, **attrs: Any) -> Val:
        return Val(self.b.op(op, inputs, hint=self.hint(node), **attrs), batched)

    def aligned(self, xs: list[Any]) -> tuple[list[str], bool]:
        """IR names for mixed tensor/scalar operands; an unbatched full-rank operand loses its leading 1."""
        tensors = [x for x in xs if isinstance(x, Val)]
        batched, rank = any(x.batched for x in tensors), max(self.rank(x) for x in tensors)
        is_float = any(isinstance(x, float) for x in xs) or any(self.b.type_of(x.name).dtype != "int64" for x in tensors)
        names = []
        for x in xs:
            if not isinstance(x, Val):
                names.append(self.const(x, "float32" if is_float else "int64"))
            elif batched and not x.batched and self.rank(x) == rank:
                names.append(self.unbatch(x))
            else:
                names.append(x.name)
        return names, batched

    # ------------------------------------------------------------------ lowering

    def lower(self) -> tuple[Function, dict[str, np.ndarray], dict[str, Any]]:
        output = next(n for n in self.nodes if n.op == "output")
        logits = output.args[0][0] if isinstance(output.args[0], (list, tuple)) else output.args[0]
        live = self._live([logits])
        for node in self.nodes:  # weights first: the builder needs their types
            if node.op == "placeholder" and node.name in self.state and node in live:
                self._state_tensor(node)
        self.transposed_weights()
        self.sites = [n for n in self.sites if n in live]  # layer i of the cache = i-th live attention
        kv = [self.strip_repeat(n.args[2]).meta["val"].shape for n in self.sites]  # [1, kv_heads, seq, d]
        self.begin(self.weights, len(self.sites), {(int(s[1]), int(s[-1])) for s in kv})
        for node in self.nodes:
            if node in live and node.op != "output":
                self.v[node] = self.lower_node(node)
        self.where = _source_line(logits)
        fn, meta = self.end(self.v[logits])
        return fn, self.weights, meta

    def _state_tensor(self, node: Any) -> None:
        target = self.state[node.name]
        tensor = self.ep.state_dict[target] if target in self.ep.state_dict else self.ep.constants[target]
        array = to_numpy(tensor)
        if node.name in self.ep.graph_signature.inputs_to_parameters or array.size > CONST_LIMIT:
            self.weights[weight_name(target)] = array
        else:
            self.consts[node.name] = array

    def lower_node(self, node: Any) -> Any:
        if node.op == "placeholder":
            if node.name in self.state:
                target = weight_name(self.state[node.name])
                if target in self.weights:
                    return Val(self.b.weight(target), False)
                array = self.consts[node.name]
                return Val(self.const(array, "float32" if array.dtype.kind == "f" else str(array.dtype)), False)
            if node.name == "position_ids":
                return Val(self.positions, True)
            return Val(self.tokens, True) if node is self.user[0] else None
        name = _packet(node) if node.target is not operator.getitem else "getitem"
        handler = getattr(self, f"op_{name}", None)
        if name in UNARY:
            return self.emit(node, name, [self.arg(node, 0, "self").name], self.arg(node, 0, "self").batched)
        if name in IDENTITY:
            return self.arg(node, 0, "input")
        if name in RESHAPE:
            return self.reshape(node, self.arg(node, 0, "self"))
        if name in BINARY:
            return self.binary(node, name)
        if handler is None:
            raise BitsmithError(f"ATen op {node.target} has no IR lowering", where=_source_line(node),
                                fix="rewrite that part of the model with supported ops, or add a lowering")
        return handler(node)

    def binary(self, node: Any, name: str) -> Val:
        a, b = self.arg(node, 0, "self"), self.arg(node, 1, "other")
        if name == "rsub":
            a, b = b, a
        alpha = node.kwargs.get("alpha", 1)
        if node.kwargs.get("rounding_mode") is not None or alpha != 1:
            raise BitsmithError(f"{node.target} with {dict(node.kwargs)} is not supported", where=_source_line(node))
        names, batched = self.aligned([a, b])
        return self.emit(node, BINARY[name], names, batched)

    def op_sym_size(self, node: Any) -> None:
        return None  # shapes come from each node's traced metadata

    def op_arange(self, node: Any) -> Val:
        """arange(seq) is the prefill's token positions; under a KV cache they are the `positions` input."""
        args = list(node.args) + [1] * (3 - len(node.args))
        start, step = (0, 1) if len(node.args) == 1 else (args[0], args[2])
        end = node.meta["val"].shape[0]
        if start == 0 and step == 1 and not isinstance(end, int) and end.node.expr == self.seq_expr:
            return Val(self.positions, False)
        raise BitsmithError(f"aten.arange{tuple(node.args)} is not the token positions", where=_source_line(node))

    def op_to(self, node: Any) -> Val:
        import torch  # heavy: torch

        x = self.arg(node, 0, "self")
        dtypes = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if isinstance(a, torch.dtype)]
        src = self.b.type_of(x.name).dtype
        if not dtypes or (dtypes[0].is_floating_point and src != "int64"):
            return x  # activations are float32 in the IR whatever the traced float dtype
        target = "float32" if dtypes[0].is_floating_point else str(dtypes[0]).replace("torch.", "")
        return x if target == src else self.emit(node, "cast", [x.name], x.batched, dtype=target)

    op__to_copy = op_to

    def op_getitem(self, node: Any) -> Any:
        return self.v[node.args[0]][node.args[1]]

    def op_embedding(self, node: Any) -> Val:
        table, ids = self.arg(node, 0, "weight"), self.arg(node, 1, "indices")
        return self.emit(node, "embedding", [table.name, ids.name], ids.batched)

    def op_linear(self, node: Any) -> Val:
        x, w, bias = self.arg(node, 0, "input"), self.arg(node, 1, "weight"), self.arg(node, 2, "bias")
        return self.emit(node, "linear", [x.name, w.name] + ([bias.name] if bias else []), x.batched)

    def op_layer_norm(self, node: Any) -> Val:
        x, shape = self.arg(node, 0, "input"), self.arg(node, 1, "normalized_shape")
        w, bias, eps = self.arg(node, 2, "weight"), self.arg(node, 3, "bias"), self.arg(node, 4, "eps", 1e-5)
        if len(shape) != 1 or (bias is not None and w is None):
            raise BitsmithError(f"layer_norm over {shape} is not supported", where=_source_line(node))
        params = [p.name for p in (w, bias) if p is not None]
        return self.emit(node, "layernorm", [x.name] + params, x.batched, eps=float(eps))

    def op_gelu(self, node: Any) -> Val:
        x, approx = self.arg(node, 0, "self"), self.arg(node, 1, "approximate", "none")
        return self.emit(node, "gelu", [x.name], x.batched, **({"approximate": "tanh"} if approx == "tanh" else {}))

    def op_pow(self, node: Any) -> Val:
        x, e = self.arg(node, 0, "self"), self.arg(node, 1, "exponent")
        if isinstance(e, Val):
            raise BitsmithError("pow with a tensor exponent is not supported", where=_source_line(node))
        return self.emit(node, "pow", [x.name], x.batched, exponent=float(e))

    def op_mean(self, node: Any) -> Val:
        x, dims, keep = self.arg(node, 0, "self"), self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False)
        axes = [self.axis(x, d, node) for d in dims]
        return self.emit(node, "mean", [x.name], x.batched, axes=axes, keepdim=bool(keep))

    def op_softmax(self, node: Any) -> Val:
        x = self.arg(node, 0, "self")
        return self.emit(node, "softmax", [x.name], x.batched, axis=self.axis(x, self.arg(node, 1, "dim"), node))

    op__softmax = op_softmax

    def _window(self, node: Any) -> int | None:
        """The sliding window of the attention module that issued this SDPA (the mask itself is dropped)."""
        for path, _ in reversed(list((node.meta.get("nn_module_stack") or {}).values())):
            try:
                mod = self.model.get_submodule(path)
            except AttributeError:
                continue
            if hasattr(mod, "sliding_window"):
                return mod.sliding_window or None
            if "attention" in type(mod).__name__.lower() and hasattr(getattr(mod, "config", None), "sliding_window"):
                return mod.config.sliding_window or None
        return None

    def op_attention(self, node: Any) -> Val:
        if not is_attention(node):
            raise BitsmithError(f"ATen op {node.target} has no IR lowering", where=_source_line(node))
        q, k, v = (self.v[n] for n in node.args[:3])  # [1, heads | kv_heads, seq, d]
        scale, window, softcap = attention_attrs(node)
        return self.attention(q, k, v, scale, window, self.hint(node), softcap)

    def op_scaled_dot_product_attention(self, node: Any) -> Val:
        q, k, v = (self.v[n] for n in (node.args[0], self.strip_repeat(node.args[1]), self.strip_repeat(node.args[2])))
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        if mask is None and not self.arg(node, 5, "is_causal", False):
            raise BitsmithError("non-causal attention (no mask, is_causal=False)", where=_source_line(node),
                                fix="only causal decoders can run with a KV cache")
        if mask is not None and str(mask.meta["val"].dtype) != "torch.bool":
            raise BitsmithError("attention with a float mask (a bias such as ALiBi) is not supported",
                                where=_source_line(node), fix="only causal / sliding-window masks map to the IR")
        scale = self.arg(node, 6, "scale") or 1.0 / math.sqrt(self.b.type_of(q.name).shape[-1])
        return self.attention(q, k, v, scale, self._window(node), self.hint(node))


def trace_module(model: Any, example_ids: Any, rope_candidates: list[dict] | None = None,
                 meta: dict[str, Any] | None = None) -> tuple[Module, dict[str, np.ndarray]]:
    """Trace `model(input_ids[, position_ids], use_cache=False)` with a dynamic token dim; returns (module, weights).

    `rope_candidates` ([{theta, scaling}]) lets the RoPE fusion recognise scaled inverse frequencies.
    """
    import torch  # heavy: torch

    ids = torch.as_tensor(example_ids, dtype=torch.long).reshape(1, -1)
    seq = torch.export.Dim("seq", min=1, max=1 << 20)
    params = inspect.signature(model.forward).parameters
    accepts = (lambda name: name in params or any(p.kind == p.VAR_KEYWORD for p in params.values()))
    kwargs, dyn = {"input_ids": ids}, {"input_ids": {1: seq}}
    if accepts("position_ids"):  # positions as an input, so RoPE reads the IR `positions`
        kwargs["position_ids"], dyn["position_ids"] = torch.arange(ids.shape[1])[None], {1: seq}
    if accepts("use_cache"):
        kwargs["use_cache"], dyn["use_cache"] = False, None
    was_training = model.training
    try:
        model.eval()
        # HF attention as one bitsmith::attention op (hf_attention.py), other modules' SDPA lowered as is; MoE
        # experts as one custom op (hf_moe.py)
        with torch.no_grad(), traced_attention(model), traceable_experts(model):
            ep = torch.export.export(model, (), kwargs=kwargs, dynamic_shapes=dyn, strict=False)
    except Exception as exc:
        raise BitsmithError(f"torch.export could not trace {type(model).__name__}: {str(exc).splitlines()[0]}",
                            fix="make the model traceable with torch.export.export(..., strict=False)") from exc
    finally:
        model.train(was_training)
    inplace_as_values(ep.graph)  # `x /= s` in the MoE routers
    prefill, weights, shape_meta = _AtenLowering(ep, model).lower()
    info = {"frontend": "torch_export", **shape_meta, "rope_candidates": rope_candidates or [], **(meta or {})}
    return finish_module(prefill, weights, info)


def load_hf_via_export(directory: str | Path) -> LoadedModel:
    """Load an HF directory of an architecture without a hand-written mapping by tracing it with torch.export."""
    import torch  # heavy: torch
    import transformers  # heavy: torch

    directory = require_path(directory, "model directory")
    cfg = read_json(directory / "config.json")
    model_type = cfg.get("model_type")
    try:
        config = transformers.AutoConfig.from_pretrained(str(directory))
    except (ValueError, KeyError, OSError) as exc:
        raise BitsmithError(f"unsupported architecture {model_type!r}: transformers does not know it",
                            where=str(directory), fix="use a Llama/Mistral/Qwen2/Qwen3 model, or a transformers "
                                                      "version that knows this architecture") from exc
    if type(config) not in transformers.MODEL_FOR_CAUSAL_LM_MAPPING:
        raise BitsmithError(f"unsupported architecture {model_type!r}: it is not a causal (decoder-only) language model",
                            where=str(directory), fix="bitsmith compiles text-generation models such as Llama or Qwen")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32)
    except Exception as exc:  # transformers raises many unrelated types while loading; report its first line
        raise BitsmithError(f"transformers cannot load the {model_type!r} checkpoint: {str(exc).splitlines()[0]}",
                            where=str(directory), fix="check that the weights (*.safetensors) are present and complete") from exc
    try:
        theta, scaling = rope_settings(cfg)
        rope = [{"theta": theta, "scaling": scaling}]
    except (BitsmithError, KeyError, TypeError):  # a RoPE kind the IR op lacks: left unfused (still correct)
        rope = []
    module, weights = trace_module(model, torch.arange(2, 10), rope, meta={"architecture": cfg.get("model_type")})
    files = sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")) + [directory / "config.json"]
    source = {"path": str(directory.resolve()), "format": "hf-torch-export",
              "files": {p.name: sha256_file(p) for p in files}}
    tokenizer, config = hf_side_files(directory, cfg)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return LoadedModel(module, weights, tokenizer, config, source, dtype)
