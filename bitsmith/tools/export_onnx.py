"""`bitsmith export --format onnx`: the artifact's prefill IR as one ONNX decoder graph with MatMulNBits and a KV cache."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from bitsmith.errors import BitsmithError
from bitsmith.runtime.artifact import Artifact, load_artifact
from bitsmith.runtime.packed_layout import unpack
from bitsmith.runtime.quant_scheme import QuantScheme
from bitsmith.tools.export import ExportOptions, ExportReport, TensorExport
from bitsmith.tools.onnx_attention import GraphBuilder, attention, causal_bias, rope
from bitsmith.tools.onnx_nbits import NBitsWeight, NotMappable, to_nbits

# The graph (onnxruntime-genai's decoder I/O; one graph runs prefill and decode):
#   inputs   input_ids int64 [batch, seq], attention_mask int64 [batch, past_seq + seq] (1 = a real token),
#            position_ids int64 [batch, seq], past_key_values.{i}.key / .value [batch, kv_heads, past_seq, head_dim]
#   outputs  logits float32 [batch, seq, vocab], present.{i}.key / .value [batch, kv_heads, past_seq + seq, head_dim]
# KV tensors are float16 when the artifact's cache is float16 (what our runtime stores), else float32.
# Every IR value gains a leading batch axis: the IR's [seq, ...] is [batch, seq, ...] here.
MODEL_FILE = "model.onnx"
EXTERNAL_DATA = "model.onnx.data"
EXTERNAL_ABOVE = 1 << 30  # bytes of initializers above which they go to EXTERNAL_DATA (protobuf stops at 2 GiB)
OPSET = 21
UNARY = {"sigmoid": "Sigmoid", "tanh": "Tanh", "neg": "Neg", "exp": "Exp", "sqrt": "Sqrt", "cos": "Cos", "sin": "Sin"}
BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div"}
ACCURACY_LEVELS = (0, 1, 2, 3, 4)  # MatMulNBits: 0 unset (fp32 activations here), 4 = int8 activations


def export_onnx(artifact_dir: Path, out: Path, options: ExportOptions, accuracy_level: int | None = None) -> ExportReport:
    """Write OUT/model.onnx (+ model.onnx.data when large), the tokenizer files and genai_config.json."""
    artifact = load_artifact(artifact_dir, check_hashes=False)
    level = options.accuracy_level if accuracy_level is None else accuracy_level
    if level not in ACCURACY_LEVELS:
        raise BitsmithError(f"accuracy level {level!r}", where="onnx export",
                            fix="use 0 (float activations) or 4 (int8 activations); 1-3 as onnxruntime defines them")
    report = ExportReport(format="onnx", output=str(out))
    model = _Translator(artifact, options.allow_requantize, level, report).build()
    out.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_ABOVE
    onnx.save_model(model, str(out / MODEL_FILE), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=EXTERNAL_DATA, size_threshold=1024)
    onnx.checker.check_model(str(out / MODEL_FILE))
    tokenizer = artifact.manifest["tokenizer"] or {}
    for name in tokenizer.get("files", []):
        shutil.copy2(artifact.directory / name, out / name)
    if not tokenizer:
        report.notes.append("the artifact has no tokenizer: none written (genai needs token ids)")
    elif (out / "tokenizer.json").is_file() and not (out / "tokenizer_config.json").is_file():
        (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(out / "tokenizer.json", tokenizer),
                                                              indent=2) + "\n")
    elif not (out / "tokenizer.json").is_file():
        report.notes.append(f"tokenizer {tokenizer.get('kind')!r} has no tokenizer.json: onnxruntime-genai cannot "
                            "tokenize (token ids still work)")
    (out / "genai_config.json").write_text(json.dumps(genai_config(artifact), indent=2) + "\n")
    report.notes.append(f"accuracy_level={level}" + (" (int8 activations in MatMulNBits)" if level == 4 else ""))
    if large:
        report.notes.append(f"initializers in {EXTERNAL_DATA}")
    return report


def tokenizer_config(path: Path, tok: dict[str, Any]) -> dict[str, Any]:
    """The tokenizer_config.json onnxruntime-genai's tokenizer wants beside tokenizer.json (special tokens by text)."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(path))
    eos = (tok.get("eos_token_ids") or [None])[0]
    bos = tok.get("bos_token_id")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": bool(tok.get("add_bos")),
              "add_eos_token": False, "clean_up_tokenization_spaces": False,
              "bos_token": vocab.id_to_token(bos) if bos is not None else None,
              "eos_token": vocab.id_to_token(eos) if eos is not None else None}
    if tok.get("chat_template"):
        config["chat_template"] = tok["chat_template"]
    return config


def genai_config(artifact: Artifact) -> dict[str, Any]:
    """onnxruntime-genai's genai_config.json for this graph (greedy search by default)."""
    cfg, tok = artifact.config, artifact.manifest["tokenizer"] or {}
    layers, _, _, kvh, head_dim = artifact.manifest["ir"]["functions"]["prefill"]["inputs"][2][1]["shape"]
    eos = tok.get("eos_token_ids") or [cfg.get("eos_token_id")]
    return {"model": {
        "bos_token_id": tok.get("bos_token_id", cfg.get("bos_token_id")),
        "context_length": artifact.max_context,
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": MODEL_FILE, "head_size": head_dim, "hidden_size": cfg.get("hidden_size"),
            "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                       "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
            "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                        "present_value_names": "present.%d.value"},
            "num_attention_heads": cfg.get("num_heads", kvh), "num_hidden_layers": layers,
            "num_key_value_heads": kvh},
        "eos_token_id": eos if len(eos) > 1 else eos[0], "pad_token_id": cfg.get("pad_token_id") or eos[0],
        "type": "llama", "vocab_size": cfg.get("vocab_size")},
        "search": {"do_sample": False, "early_stopping": True, "max_length": artifact.max_context, "min_length": 0,
                   "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                   "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0}}


class _Translator:
    """Walks the artifact's prefill function node by node, emitting ONNX nodes into a GraphBuilder."""

    def __init__(self, artifact: Artifact, allow_requantize: bool, level: int, report: ExportReport) -> None:
        self.artifact, self.allow_requantize, self.level, self.report = artifact, allow_requantize, level, report
        self.fn = artifact.manifest["ir"]["functions"]["prefill"]
        self.plan = artifact.manifest["ir"].get("meta", {}).get("precision_plan") or {}
        self.weights = artifact.weights
        self.g = GraphBuilder()
        self.values: dict[str, str] = {}  # IR value -> ONNX tensor name
        self.weight_of: dict[str, str] = {}  # IR value of a weight node -> weight name
        self.dense: dict[str, str] = {}  # weight name -> float32 ONNX tensor (one per weight, so tied weights share)
        self.cache_values: set[str] = set()
        self.kv_dtype: str | None = None
        self.bias: dict[Any, str] = {}

    def build(self) -> onnx.ModelProto:
        cfg = self.artifact.config
        names = [name for name, _ in self.fn["inputs"]]
        if len(names) != 3:
            raise BitsmithError(f"prefill takes {names}, expected (tokens, positions, kv_cache)", where="onnx export",
                                fix="export an artifact of a decoder compiled by this bitsmith")
        self.values[names[0]], self.values[names[1]] = "input_ids", "position_ids"
        self.cache_values.add(names[2])
        cache_shape = self.fn["inputs"][2][1]["shape"]  # [layers, 2, ctx, kv_heads, head_dim]
        self.n_layers, self.kv_heads, self.head_dim = cache_shape[0], cache_shape[3], cache_shape[4]
        kv_dtypes = {n["attrs"].get("kv_dtype", "float32") for n in self.fn["nodes"] if n["op"] == "attention"}
        self.kv_dtype = "float16" if kv_dtypes == {"float16"} else "float32"
        if kv_dtypes - {"float16", "float32"}:
            self.report.notes.append(f"the artifact's {sorted(kv_dtypes)} KV cache is emulated per token in float32 "
                                     "(int8 codes times their scale, int4 min + code * step), stored float32")
        for node in self.fn["nodes"]:
            self._node(node)
        logits = self.values[self.fn["outputs"][0]]
        self.g.node("Identity", [logits], out="logits")
        kv_elem = TensorProto.FLOAT16 if self.kv_dtype == "float16" else TensorProto.FLOAT
        kvh, hd = self.kv_heads, self.head_dim
        inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                  helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total_seq"]),
                  helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"])]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.get("vocab_size", "vocab")])]
        for i in range(self.n_layers):
            for kind in ("key", "value"):
                inputs.append(helper.make_tensor_value_info(f"past_key_values.{i}.{kind}", kv_elem,
                                                            ["batch", kvh, "past_seq", hd]))
                outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", kv_elem,
                                                             ["batch", kvh, "total_seq", hd]))
        graph = helper.make_graph(self.g.nodes, "bitsmith_decoder", inputs, outputs, self.g.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET),
                                                        helper.make_opsetid("com.microsoft", 1)],
                                  producer_name="bitsmith")
        model.ir_version = 10
        return model

    # -- values ----------------------------------------------------------------------------------------------------

    def _in(self, value: str) -> str:
        if value in self.values:
            return self.values[value]
        if value in self.weight_of:
            return self._dense(self.weight_of[value])
        raise BitsmithError(f"IR value {value!r} is used before it is defined", where="onnx export",
                            fix="recompile the artifact (its IR is not in topological order)")

    def _dense(self, name: str) -> str:
        """A float32 tensor of a stored weight: float16 stays float16 in the file, cast once in the graph."""
        if name not in self.dense:
            w = np.asarray(self.weights[name])
            if w.dtype == np.float16:
                self.dense[name] = self.g.node("Cast", [self.g.const(w, name)], to=TensorProto.FLOAT)
            else:
                self.dense[name] = self.g.const(w.astype(np.float32), name)
            stored = "float16" if w.dtype == np.float16 else "float32"
            self.report.tensors.append(TensorExport(name, str(w.dtype), stored))
        return self.dense[name]

    # -- nodes -----------------------------------------------------------------------------------------------------

    def _node(self, node: dict[str, Any]) -> None:
        op, ins, outs, attrs = node["op"], node["inputs"], node["outputs"], node["attrs"]
        g = self.g
        if op == "weight":
            self.weight_of[outs[0]] = attrs["name"]
            return
        if op == "attention":
            layer = attrs["layer"]
            if attrs.get("sliding_window") not in (None, 0):
                key = ("window", attrs["sliding_window"])
            else:
                key = ("causal", 0)
            if key not in self.bias:
                self.bias[key] = causal_bias(g, key[1])
            q, k, v = (self._in(x) for x in ins[:3])
            self.values[outs[0]] = attention(g, q, k, v, layer, self.bias[key], attrs, self.kv_heads,
                                             self.head_dim, attrs.get("kv_dtype", "float32"), self.kv_dtype)
            self.cache_values.add(outs[1])
            return
        if op == "qlinear":
            self.values[outs[0]] = self._qlinear(node)
            return
        if op == "const":
            value = np.asarray(attrs["value"], dtype=np.float32 if attrs["dtype"].startswith(("float", "bfloat"))
                               else attrs["dtype"])
            self.values[outs[0]] = g.const(value, outs[0])
            return
        x = [self._in(v) for v in ins]
        if op == "embedding":
            out = g.node("Gather", [x[0], x[1]], axis=0)
        elif op == "linear":
            out = g.node("MatMul", [x[0], g.node("Transpose", [x[1]], perm=[1, 0])])
            if len(x) == 3:
                out = g.node("Add", [out, x[2]])
        elif op == "rmsnorm":
            eps = g.const(np.float32(attrs["eps"]), None)
            var = g.node("ReduceMean", [g.node("Mul", [x[0], x[0]]), g.const(np.array([-1]), None)], keepdims=1)
            out = g.node("Div", [x[0], g.node("Sqrt", [g.node("Add", [var, eps])])])
            if len(x) > 1:
                out = g.node("Mul", [out, x[1]])
        elif op == "layernorm":
            scale = x[1] if len(x) > 1 else g.const(np.ones(1, np.float32), None)
            out = g.node("LayerNormalization", [x[0], scale] + x[2:3], axis=-1, epsilon=float(attrs["eps"]))
        elif op == "rope":
            out = rope(g, x[0], x[1], {"rotary_dim": self.head_dim, **attrs})
        elif op == "silu":
            out = g.node("Mul", [x[0], g.node("Sigmoid", [x[0]])])
        elif op == "gelu":
            out = g.node("Gelu", [x[0]], approximate=attrs.get("approximate", "none"))
        elif op == "rsqrt":
            out = g.node("Reciprocal", [g.node("Sqrt", [x[0]])])
        elif op == "pow":
            out = g.node("Pow", [x[0], g.const(np.float32(attrs["exponent"]), None)])
        elif op in UNARY:
            out = g.node(UNARY[op], x)
        elif op in BINARY:
            out = g.node(BINARY[op], x)
        elif op == "softmax":
            out = g.node("Softmax", x, axis=_shift_axis(attrs.get("axis", -1)))
        elif op == "slice":
            step = attrs.get("step", 1)
            if step is None or step <= 0:
                raise BitsmithError(f"slice with step {step} (node {outs[0]})", where="onnx export",
                                    fix="only forward slices are exported")
            start = 0 if attrs["start"] is None else attrs["start"]
            end = 1 << 62 if attrs["end"] is None else attrs["end"]
            out = g.node("Slice", [x[0]] + [g.const(np.array([v]), None) for v in
                                            (start, end, _shift_axis(attrs["axis"]), step)])
        elif op == "concat":
            out = g.node("Concat", x, axis=_shift_axis(attrs["axis"]))
        elif op == "mean":
            axes = np.array([_shift_axis(a) for a in attrs["axes"]])
            out = g.node("ReduceMean", [x[0], g.const(axes, None)], keepdims=int(bool(attrs.get("keepdim", False))))
        elif op == "transpose":
            out = g.node("Transpose", x, perm=[0] + [p + 1 for p in attrs["perm"]])
        elif op == "reshape":
            shape = list(attrs["shape"])
            if not shape or shape[0] not in (-1, "seq") or not all(isinstance(d, int) and d > 0 for d in shape[1:]):
                raise BitsmithError(f"reshape to {shape} (node {outs[0]}) does not keep the sequence axis first",
                                    where="onnx export", fix="only reshapes of [seq, ...] rows are exported")
            out = g.node("Reshape", [x[0], g.const(np.array([0, 0] + shape[1:], dtype=np.int64), None)])
        else:
            raise BitsmithError(f"IR op {op!r} (node {outs[0]}) has no ONNX translation", where="onnx export",
                                fix="dense decoders export (the 17 non-MoE families of the README); MoE routing "
                                    "(router/moe/qmoe) has no ONNX translation yet")
        self.values[outs[0]] = out

    def _qlinear(self, node: dict[str, Any]) -> str:
        ins, attrs = node["inputs"], node["attrs"]
        names = [self.weight_of.get(v) for v in ins]
        order = ["x", "qweight", "scales"]
        order += ["zeros"] * (not attrs["sym"])
        order += ["super_scales"] * bool(attrs.get("super_group"))
        order += ["super_zeros"] * bool(attrs.get("super_group") and attrs.get("offset"))
        order += ["perm"] * bool(attrs.get("has_perm"))
        order += ["bias"] * bool(attrs.get("has_bias"))
        part = dict(zip(order, names))
        name = part["qweight"].removesuffix(".qweight") + ".weight"
        where = f"onnx export, {name}"
        bits, k, group = attrs["bits"], attrs["in_features"], attrs["group_size"]
        codes = unpack(np.asarray(self.weights[part["qweight"]]), bits, k)
        g_cols = k if group == -1 else group
        n_groups = -(-k // g_cols)
        scales = np.asarray(self.weights[part["scales"]]).astype(np.float32)
        zeros = offsets = None
        sg = attrs.get("super_group") or 0
        if sg:  # K-quants: int8 sub-block codes times the float16 super-block scale, one per `sg` columns (exact in f32)
            sup = (np.arange(n_groups) * g_cols) // sg
            scales = scales * np.asarray(self.weights[part["super_scales"]]).astype(np.float32)[:, sup]
        if not attrs["sym"]:
            z = np.asarray(self.weights[part["zeros"]]).astype(np.float32)
            if attrs.get("offset"):
                offsets = z * np.asarray(self.weights[part["super_zeros"]]).astype(np.float32)[:, sup] if sg else z
            else:
                zeros = z
        scheme = self._scheme_name(name, attrs)
        x = self._in(ins[0])
        if "perm" in part:  # act-order: codes are stored in permuted column order, y = Wp @ x[perm]
            x = self.g.node("Gather", [x, self.g.const(np.asarray(self.weights[part["perm"]]).astype(np.int64), None)],
                            axis=-1)
        try:
            nb = to_nbits(codes, bits, group, scales, zeros, offsets, accuracy_level=self.level, where=where)
        except NotMappable:
            if not self.allow_requantize:
                raise
            out = self._float_fallback(name, scheme, codes, bits, g_cols, scales, zeros, offsets, x)
        else:
            out = self._nbits(name, nb, x)
            self.report.tensors.append(TensorExport(name, scheme, nb.target, True, nb.max_abs_error))
            if nb.note:
                self.report.notes.append(f"{name}: {nb.note}")
        if "bias" in part:
            out = self.g.node("Add", [out, self._in(ins[order.index("bias")])])
        return out

    def _nbits(self, name: str, nb: NBitsWeight, x: str) -> str:
        """y = sum of the MatMulNBits parts (+ group sums of x @ offsets^T): see onnx_nbits.py."""
        g, out = self.g, None
        for i, p in enumerate(nb.parts):
            tag = f"{name}.{i}" if len(nb.parts) > 1 else name
            y = g.node("MatMulNBits", [x, g.const(p.blob, f"{tag}.B"), g.const(p.scales, f"{tag}.scales")],
                       domain="com.microsoft", K=nb.k, N=nb.n, bits=p.bits, block_size=nb.block_size,
                       accuracy_level=self.level)
            out = y if out is None else g.node("Add", [out, y])
        if nb.offsets is not None:
            sums = self._group_sums(x, nb.k, nb.group_size)  # [B, S, n_groups]
            out = g.node("Add", [out, g.node("MatMul", [sums, g.const(np.ascontiguousarray(nb.offsets.T),
                                                                         f"{name}.offsets")])])
        return out

    def _group_sums(self, x: str, k: int, group: int) -> str:
        """x [B, S, K] -> [B, S, ceil(K / group)] sums over each group's columns (zero-padded), shared per input."""
        key = f"groupsum:{x}:{group}"
        if key not in self.g.cache:
            g, n_groups = self.g, -(-k // group)
            if n_groups * group != k:
                x = g.node("Pad", [x, g.const(np.array([0, 0, 0, 0, 0, n_groups * group - k]), None)])
            grouped = g.node("Reshape", [x, g.const(np.array([0, 0, n_groups, group]), None)])
            self.g.cache[key] = g.node("ReduceSum", [grouped, g.const(np.array([-1]), None)], keepdims=0)
        return self.g.cache[key]

    def _float_fallback(self, name: str, scheme: str, codes: np.ndarray, bits: int, g_cols: int, scales: np.ndarray,
                        zeros: np.ndarray | None, offsets: np.ndarray | None, x: str) -> str:
        """--allow-requantize: our dequantized weight as a float32 MatMul (same values, 32 bits per weight)."""
        group = np.arange(codes.shape[1]) // g_cols
        q = codes.astype(np.float32)
        if offsets is not None:
            w = scales[:, group] * q + offsets[:, group]
        else:
            z = np.float32(1 << (bits - 1)) if zeros is None else zeros[:, group]
            w = (q - z) * scales[:, group]
        wt = self.g.const(np.ascontiguousarray(w.T), f"{name}.dequantized")
        self.report.tensors.append(TensorExport(name, scheme, "float32 MatMul", False, 0.0))
        self.report.notes.append(f"{name}: {scheme} has no exact MatMulNBits form; stored dequantized as float32")
        return self.g.node("MatMul", [x, wt])

    def _scheme_name(self, name: str, attrs: dict[str, Any]) -> str:
        try:
            return QuantScheme.from_json(self.plan[name]).name
        except (KeyError, BitsmithError):
            return f"int{attrs['bits']}-g{attrs['group_size']}-{'sym' if attrs['sym'] else 'asym'}"


def _shift_axis(axis: int) -> int:
    return axis if axis < 0 else axis + 1
