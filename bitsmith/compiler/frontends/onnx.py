"""ONNX frontend: lower a decoder exported by torch.onnx.export (input_ids -> logits, no KV cache) to the IR."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import numpy as np

from bitsmith.compiler.frontends.base import LoadedModel, require_path, sha256_file
from bitsmith.compiler.frontends.graph_lowering import (CONST_LIMIT, SEQ, GraphLowering, Val, finish_module,
                                                        weight_name)
from bitsmith.compiler.frontends.hf_files import hf_side_files, read_json
from bitsmith.compiler.ir import Function
from bitsmith.errors import BitsmithError

UNARY = {"Sigmoid": "sigmoid", "Tanh": "tanh", "Neg": "neg", "Cos": "cos", "Sin": "sin", "Exp": "exp", "Sqrt": "sqrt"}
BINARY = {"Add": "add", "Sub": "sub", "Mul": "mul", "Div": "div", "MatMul": "matmul"}
RESHAPE = ("Reshape", "Unsqueeze", "Squeeze", "Flatten")
FLOAT_CODES = (1, 10, 16)  # TensorProto FLOAT, FLOAT16, BFLOAT16
INT_CODES = {6: "int32", 7: "int64", 9: "bool"}
DATA_ONLY = RESHAPE + ("Expand", "Slice", "ReduceMean", "Pow", "Split")  # other inputs are static shapes/axes


def _attrs(node: Any) -> dict[str, Any]:
    import onnx  # heavy: onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class _OnnxLowering(GraphLowering):
    """Lowers the live part of an ONNX graph into the IR `prefill` function, batch dim dropped."""

    def __init__(self, model: Any, where: str):
        import onnx  # heavy: onnx
        from onnx import numpy_helper  # heavy: onnx

        if len(model.graph.value_info) < len(model.graph.node) // 2:  # shapes drive reshape/expand targets
            try:
                model = onnx.shape_inference.infer_shapes(model)
            except Exception:  # noqa: BLE001 - inference is best effort; missing shapes are reported where needed
                pass
        self.where, graph = where, model.graph
        self.static: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inits = set(self.static)
        self.prod: dict[str, Any] = {}
        for node in graph.node:
            self.prod.update({o: node for o in node.output})
            if node.op_type == "Constant":
                self.static[node.output[0]] = numpy_helper.to_array(_attrs(node)["value"])
        self.shapes: dict[str, list] = {}
        for v in list(graph.value_info) + list(graph.input) + list(graph.output):
            dims = v.type.tensor_type.shape.dim
            self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims]
        ints = [i for i in graph.input if i.type.tensor_type.elem_type in (6, 7)]  # int32 / int64
        self.ids = next((i.name for i in ints if "input_ids" in i.name), ints[0].name if ints else None)
        if self.ids is None or len(self.shapes[self.ids]) != 2:
            raise BitsmithError("the graph has no input_ids [batch, seq] input", where=where,
                                fix="export the decoder with torch.onnx.export(model, (input_ids,), ...)")
        self.seq = self.shapes[self.ids][1]
        self.logits = graph.output[0].name
        self.has_positions = any(i.name == "position_ids" for i in graph.input)
        self.nodes = list(graph.node)
        self.sites = {n.output[0]: s for n in self.nodes if n.op_type == "MatMul" and (s := self._site(n))}
        self.v: dict[str, Any] = {}
        self.weights: dict[str, np.ndarray] = {}

    # ------------------------------------------------------------------ attention pattern

    def _op(self, value: str, *types: str) -> Any:
        node = self.prod.get(value)
        return node if node is not None and node.op_type in types else None

    def _scalar(self, value: str) -> float | None:
        s = self.static.get(value)
        return float(s.reshape(-1)[0]) if s is not None and s.size == 1 else None

    def _peel_scale(self, value: str) -> tuple[str, float]:
        scale = 1.0
        while (node := self._op(value, "Mul", "Div")) is not None:
            c = [self._scalar(i) for i in node.input]
            if node.op_type == "Mul" and c[1] is not None:
                value, scale = node.input[0], scale * c[1]
            elif node.op_type == "Mul" and c[0] is not None:
                value, scale = node.input[1], scale * c[0]
            elif node.op_type == "Div" and c[1] is not None:
                value, scale = node.input[0], scale / c[1]
            else:
                break
        return value, scale

    def _strip_repeat(self, value: str) -> str:
        """GQA's repeat_kv (Unsqueeze(2) -> Expand -> Reshape) back to the kv-headed tensor."""
        exp = self._op(self._op(value, "Reshape").input[0], "Expand") if self._op(value, "Reshape") else None
        unsq = self._op(exp.input[0], "Unsqueeze") if exp is not None else None
        if unsq is not None and list(self.static.get(unsq.input[1], [])) == [2]:
            return unsq.input[0]
        return value

    def _key(self, value: str) -> str | None:
        """K [1, kv, seq, d] behind K^T: a Reshape/Transpose chain with one swap of the last two axes."""
        swaps = 0
        while (node := self._op(value, "Reshape", "Transpose")) is not None:
            if node.op_type == "Transpose":
                perm = list(_attrs(node)["perm"])
                if perm != list(range(len(perm) - 2)) + [len(perm) - 1, len(perm) - 2]:
                    return None
                swaps += 1
            value = node.input[0]
            if swaps == 1 and len(self.shapes.get(value) or []) == 4 and self.shapes[value][2] == self.seq:
                return value
        return None

    def _is_boolean_mask(self, value: str) -> bool:
        """`where(allowed, 0, -big)`: a mask with no bias values in it."""
        w = self._op(value, "Where")
        vals = [self._scalar(i) for i in w.input[1:]] if w is not None else []
        if len(vals) != 2 or None in vals:
            return False
        return max(vals) == 0.0 and min(vals) < -1e30  # -inf or the dtype's lowest

    def _site(self, node: Any) -> dict | None:
        """softmax(Q K^T * scale + mask) @ V, as the exporter decomposes SDPA (or eager attention)."""
        probs = node.input[0]
        if (w := self._op(probs, "Where")) is not None and self._op(w.input[0], "IsNaN"):
            probs = w.input[2]  # the NaN guard of fully masked rows
        soft = self._op(probs, "Softmax")
        if soft is None:
            return None
        scores = soft.input[0]
        if (add := self._op(scores, "Add")) is not None:  # + mask: dropped, the IR attention op is causal
            scores = next((i for i in add.input if self._op(self._peel_scale(i)[0], "MatMul")), None)
            if not self._is_boolean_mask(next((i for i in add.input if i != scores), "")):
                return None  # a float bias (ALiBi, relative positions) would be lost
        scores, s0 = self._peel_scale(scores or "")
        mm = self._op(scores, "MatMul")
        if mm is None:
            return None
        (q, s1), (kt, s2) = self._peel_scale(mm.input[0]), self._peel_scale(mm.input[1])
        k = self._key(kt)
        if k is None:
            return None
        return {"q": q, "k": self._strip_repeat(k), "v": self._strip_repeat(node.input[1]), "scale": s0 * s1 * s2}

    # ------------------------------------------------------------------ liveness and shapes

    def _deps(self, node: Any) -> list[str]:
        if node.output[0] in self.sites:
            site = self.sites[node.output[0]]
            return [site["q"], site["k"], site["v"]]
        if node.op_type == "Range":
            return []
        if node.op_type == "Reciprocal" and self._op(node.input[0], "Sqrt"):
            return list(self.prod[node.input[0]].input)
        return [node.input[0]] if node.op_type in DATA_ONLY else [i for i in node.input if i]

    def _live(self) -> set:
        live, stack = set(), [self.logits]
        while stack:
            value = stack.pop()
            node = self.prod.get(value)
            if node is not None and node.output[0] not in live:
                live.add(node.output[0])
                stack.extend(d for d in self._deps(node) if d not in self.inits)
        return live

    def dims(self, value: str, batched: bool) -> list:
        shape = self.shapes.get(value)
        if shape is None or any(d is None for d in shape):
            raise BitsmithError(f"the shape of {value!r} is unknown", where=self.where,
                                fix="export with shape information (torch.onnx.export does by default)")
        out = []
        for d in shape[1 if batched else 0:]:
            if isinstance(d, str) and d != self.seq:
                raise BitsmithError(f"dimension {d!r} of {value!r} is not the token count", where=self.where)
            out.append(SEQ if d == self.seq else d)
        return out

    # ------------------------------------------------------------------ values

    def tensor(self, value: str) -> Val:
        if value in self.v:
            return self.v[value]
        if value not in self.static:
            raise BitsmithError(f"graph input {value!r} is used by the computation", where=self.where,
                                fix="only input_ids (and position_ids) may feed the decoder")
        if self._is_weight(value):
            return Val(self.b.weight(weight_name(value)), False)
        return Val(self.const_of(self.static[value]), False)

    def _is_weight(self, value: str) -> bool:
        """Named parameters and large tensors are weights; small unnamed ones (and inv_freq) are constants."""
        named = "." in value and not value.endswith("inv_freq")
        return value in self.inits and (named or self.static[value].size > CONST_LIMIT)

    def const_of(self, array: np.ndarray) -> str:
        return self.const(array, "float32" if array.dtype.kind == "f" else "int64")

    def aligned(self, values: list[str]) -> tuple[list[str], bool]:
        xs = [self.tensor(v) for v in values]
        batched, rank = any(x.batched for x in xs), max(self.rank(x) for x in xs)
        return [self.unbatch(x) if batched and not x.batched and self.rank(x) == rank else x.name for x in xs], batched

    def _weight_for(self, init: str, node: Any) -> str:
        """IR weight [out, in] for MatMul's [in, out] initializer, named after the Linear that owned it."""
        meta = {p.key: p.value for p in node.metadata_props}
        name = weight_name(init) + ".T"
        try:
            scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
            if len(scopes) >= 2 and scopes[-2] and "linear" in meta.get("pkg.torch.onnx.fx_node", ""):
                name = weight_name(scopes[-2]) + ".weight"
        except (ValueError, SyntaxError):
            pass
        if name in self.weights and not np.array_equal(self.weights[name], self.static[init].T):
            name = weight_name(init) + ".T"
        self.weights[name] = np.ascontiguousarray(self.static[init].T)
        return name

    # ------------------------------------------------------------------ lowering

    def lower(self) -> tuple[Function, dict[str, np.ndarray], dict[str, Any]]:
        live = self._live()
        live_nodes = [n for n in self.nodes if n.output[0] in live]
        self.linear_w: dict[str, str] = {}
        for node in live_nodes:  # weights first: the builder needs their types
            if node.op_type == "MatMul" and node.input[1] in self.inits and self.static[node.input[1]].ndim == 2:
                self.linear_w[node.output[0]] = self._weight_for(node.input[1], node)
                continue
            for value in node.input:
                if value in self.inits and self._is_weight(value):
                    self.weights[weight_name(value)] = self.static[value]
        sites = [self.sites[n.output[0]] for n in live_nodes if n.output[0] in self.sites]
        self.begin(self.weights, len(sites), {(self.shapes[s["k"]][1], self.shapes[s["k"]][3]) for s in sites})
        self.v[self.ids] = Val(self.tokens, True)
        if self.has_positions:
            self.v["position_ids"] = Val(self.positions, True)
        for node in live_nodes:
            outs = self.lower_node(node)
            self.v.update(zip(node.output, outs if isinstance(outs, list) else [outs]))
        fn, meta = self.end(self.v[self.logits])
        return fn, self.weights, meta

    def emit(self, op: str, inputs: list[str], batched: bool, hint: str, **attrs: Any) -> Val:
        return Val(self.b.op(op, inputs, hint=hint, **attrs), batched)

    def lower_node(self, node: Any) -> Any:
        op, a, ins, hint = node.op_type, _attrs(node), list(node.input), node.output[0]
        if hint in self.sites:
            site = self.sites[hint]
            q, k, v = (self.tensor(site[key]) for key in ("q", "k", "v"))
            return self.attention(q, k, v, site["scale"], None, hint)  # a sliding window would be in the dropped mask
        if op == "MatMul" and hint in self.linear_w:
            x = self.tensor(ins[0])
            return self.emit("linear", [x.name, self.b.weight(self.linear_w[hint])], x.batched, hint)
        if op in BINARY or op == "Concat":
            names, batched = self.aligned(ins)
            if op in BINARY:
                return self.emit(BINARY[op], names, batched, hint)
            ref = next(self.tensor(i) for i in ins if self.tensor(i).batched == batched)
            return self.emit("concat", names, batched, hint, axis=self.axis(ref, a["axis"], hint))
        if op == "Reciprocal" and self._op(ins[0], "Sqrt"):
            x = self.tensor(self.prod[ins[0]].input[0])
            return self.emit("rsqrt", [x.name], x.batched, hint)
        if op == "Range" and [self._scalar(ins[0]), self._scalar(ins[2]), *self.shapes.get(hint, [])] == [0, 1, self.seq]:
            return Val(self.positions, False)  # arange(seq): the prefill's positions; under a KV cache, the input
        if op == "Gather" and a.get("axis", 0) == 0 and ins[0] in self.inits:
            ids = self.tensor(ins[1])
            return self.emit("embedding", [self.tensor(ins[0]).name, ids.name], ids.batched, hint)
        x = self.tensor(ins[0])
        dtype = self.b.type_of(x.name).dtype
        if op == "Identity" or (op == "Cast" and a["to"] in FLOAT_CODES and dtype != "int64"):
            return x  # activations are float32 in the IR whatever the exported float type
        if op in UNARY:
            return self.emit(UNARY[op], [x.name], x.batched, hint)
        if op in RESHAPE or op == "Expand":
            return self.emit("reshape" if op in RESHAPE else "broadcast_to", [x.name], x.batched, hint,
                             shape=self.dims(hint, x.batched))
        if op == "Cast":
            return self.emit("cast", [x.name], x.batched, hint, dtype=INT_CODES.get(a["to"], "float32"))
        if op == "Pow" and self._scalar(ins[1]) is not None:
            return self.emit("pow", [x.name], x.batched, hint, exponent=self._scalar(ins[1]))
        if op == "ReduceMean":
            axes = list(self.static[ins[1]]) if len(ins) > 1 else list(a["axes"])
            return self.emit("mean", [x.name], x.batched, hint, axes=[self.axis(x, int(d), hint) for d in axes],
                             keepdim=bool(a.get("keepdims", 1)))
        if op == "Softmax":
            return self.emit("softmax", [x.name], x.batched, hint, axis=self.axis(x, a.get("axis", -1), hint))
        if op == "Transpose":
            perm = list(a["perm"])
            if x.batched and perm[0] != 0:
                raise BitsmithError("a Transpose moves the batch dimension", where=self.locate(hint))
            return self.emit("transpose", [x.name], x.batched, hint, perm=[p - x.batched for p in perm[x.batched:]])
        if op == "Slice":
            return self.slice(x, ins, hint)
        if op == "Split":
            axis, n = self.axis(x, a.get("axis", 0), hint), len(node.output)
            even = [self.b.type_of(x.name).shape[axis] // n] * n
            sizes = list(self.static[ins[1]]) if len(ins) > 1 and ins[1] else even
            starts = np.cumsum([0] + sizes[:-1])
            return [self.emit("slice", [x.name], x.batched, out, axis=axis, start=int(s), end=int(s + k))
                    for out, s, k in zip(node.output, starts, sizes)]
        if op == "LayerNormalization" and a.get("axis", -1) in (-1, self.rank(x) - 1):
            params = [self.tensor(i).name for i in ins[1:] if i]
            return self.emit("layernorm", [x.name] + params, x.batched, hint, eps=float(a.get("epsilon", 1e-5)))
        if op == "Gelu":
            tanh = a.get("approximate", b"none") in (b"tanh", "tanh")
            return self.emit("gelu", [x.name], x.batched, hint, **({"approximate": "tanh"} if tanh else {}))
        raise BitsmithError(f"ONNX op {op} (node {node.name or hint}) has no IR lowering", where=self.where,
                            fix="export with the default torch.onnx.export settings, or add a lowering")

    def slice(self, x: Val, ins: list[str], hint: str) -> Val:
        """ONNX Slice (static starts/ends/axes/steps) as one IR slice per axis."""
        starts, ends = self.static[ins[1]], self.static[ins[2]]
        axes = self.static[ins[3]] if len(ins) > 3 and ins[3] else np.arange(len(starts))
        steps = self.static[ins[4]] if len(ins) > 4 and ins[4] else np.ones(len(starts), dtype=np.int64)
        for start, end, axis, step in zip(starts, ends, axes, steps):
            ax = self.axis(x, int(axis), hint)
            size = self.b.type_of(x.name).shape[ax]
            if size == SEQ and start == 0 and step == 1 and end >= (1 << 62):
                continue  # x[:, :] along the token axis
            end = min(int(end), size) if isinstance(size, int) else int(end)
            x = self.emit("slice", [x.name], x.batched, hint, axis=ax, start=int(start), end=end, step=int(step))
        return x


def _read(path: Path) -> Any:
    import onnx  # heavy: onnx

    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError / RuntimeError on damaged files
        raise BitsmithError(f"cannot read the ONNX model: {exc}", where=str(path),
                            fix="the file is truncated or not ONNX; export it again") from exc
    if not model.graph.node or not model.graph.output:
        raise BitsmithError("the file holds no ONNX graph", where=str(path), fix="the file is truncated or not ONNX")
    return model


def load_onnx(path: str | Path, tokenizer_dir: str | Path | None = None) -> LoadedModel:
    """Load an exported decoder; a tokenizer.json (and config.json) beside it (or in `tokenizer_dir`) is used."""
    path = require_path(path, "ONNX model")
    prefill, weights, meta = _OnnxLowering(_read(path), str(path)).lower()
    module, weights = finish_module(prefill, weights, {"frontend": "onnx", **meta})
    directory = Path(tokenizer_dir) if tokenizer_dir else path.parent
    cfg = read_json(directory / "config.json") if (directory / "config.json").exists() else {"model_type": "onnx"}
    tokenizer, config = hf_side_files(directory, cfg)
    source = {"path": str(path.resolve()), "format": "onnx", "files": {path.name: sha256_file(path)}}
    dtype = "float16" if any(w.dtype == np.float16 for w in weights.values()) else "float32"
    return LoadedModel(module, weights, tokenizer, {**config, **meta}, source, dtype)
