"""ONNX frontend: decoders exported by torch.onnx.export match transformers and lower to the hand-written ops."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from bitsmith.compiler.config import expected_weight_shapes
from bitsmith.compiler.frontends.hf import config_from_hf
from bitsmith.compiler.frontends.llama import build_llama_module
from bitsmith.compiler.frontends.onnx import load_onnx
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.compiler.loader import load_model
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from conftest import FAMILIES, make_tiny_hf_model
from test_torch_export import _tokenizer_json, assert_matches_transformers, op_counts, randomize_vectors, tiny_model


class _WithPositions(torch.nn.Module):
    """An export whose graph takes position_ids as a second input."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits


def export(model, path, attention: str = "sdpa", positions: bool = False) -> None:
    """torch.onnx.export with its defaults (dynamo exporter, opset 20, optimised), a dynamic token dim."""
    saved = model.config._attn_implementation
    model.config._attn_implementation, model.config.use_cache = attention, False
    ids = torch.randint(3, model.config.vocab_size, (1, 7))
    seq = torch.export.Dim("seq", min=2, max=128)
    args, names, dyn = (ids,), ["input_ids"], ({1: seq},)
    if positions:
        model, args = _WithPositions(model).eval(), (ids, torch.arange(7)[None])
        names, dyn = names + ["position_ids"], ({1: seq}, {1: seq})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # pytree deprecation noise from inside the exporter
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(model, args, str(path), input_names=names, output_names=["logits"], dynamic_shapes=dyn,
                          verbose=False)
    (model.model if positions else model).config._attn_implementation = saved


@pytest.mark.parametrize("family", FAMILIES)
def test_exported_family_matches_transformers(family, tmp_path):
    model = make_tiny_hf_model(family)
    randomize_vectors(model)  # distinct norm weights: the exporter merges identical initializers
    export(model, tmp_path / "model.onnx", positions=family == "qwen2")  # qwen2: position_ids is an input
    loaded = canonical_model(load_onnx(tmp_path / "model.onnx"))
    verify_module(loaded.module)
    assert_matches_transformers(model, loaded.module, loaded.weights)
    config = config_from_hf(model.config.to_dict())
    built = build_llama_module(config, {})
    for entry in ("prefill", "decode"):
        assert op_counts(loaded.module, entry) == op_counts(built, entry)
    assert set(loaded.weights) == set(expected_weight_shapes(config))  # Linear names recovered from metadata
    assert loaded.source["format"] == "onnx" and loaded.tokenizer is None


def test_eager_attention_export_and_tokenizer_beside_the_file(tmp_path):
    model = make_tiny_hf_model("llama")
    randomize_vectors(model)
    export(model, tmp_path / "model.onnx", attention="eager")  # matmul * scale + mask -> softmax -> matmul
    _tokenizer_json(tmp_path / "tokenizer.json")
    loaded = canonical_model(load_model(tmp_path / "model.onnx"))
    assert op_counts(loaded.module)["attention"] == 2 and loaded.tokenizer.kind == "hf"
    assert_matches_transformers(model, loaded.module, loaded.weights)


def test_gpt_neox_export(tmp_path):
    model = tiny_model("gpt_neox")
    export(model, tmp_path / "neox.onnx")
    loaded = canonical_model(load_onnx(tmp_path / "neox.onnx"))
    verify_module(loaded.module)
    counts = op_counts(loaded.module)
    assert counts["layernorm"] == 5 and counts["gelu"] == 2 and counts["rope"] == 4 and counts["attention"] == 2
    assert_matches_transformers(model, loaded.module, loaded.weights)


def _toy_graph(op: str) -> onnx.ModelProto:
    """input_ids -> embedding (Gather) -> `op` -> logits (MatMul)."""
    rng = np.random.default_rng(0)
    emb = helper.make_tensor("embed.weight", TensorProto.FLOAT, [16, 8], rng.standard_normal(128).tolist())
    head = helper.make_tensor("val_1", TensorProto.FLOAT, [8, 16], rng.standard_normal(128).tolist())
    nodes = [helper.make_node("Gather", ["embed.weight", "input_ids"], ["h"], axis=0),
             helper.make_node(op, ["h"], ["a"]),
             helper.make_node("MatMul", ["a", "val_1"], ["logits"])]
    graph = helper.make_graph(nodes, "toy", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 16])], [emb, head])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])  # the loader infers the shapes


def test_small_graph_without_attention(tmp_path):
    model = _toy_graph("Tanh")
    onnx.save(model, tmp_path / "toy.onnx")
    loaded = canonical_model(load_onnx(tmp_path / "toy.onnx"))
    verify_module(loaded.module)
    import onnxruntime

    ids = np.array([[3, 1, 4, 1, 5]], dtype=np.int64)
    ref = onnxruntime.InferenceSession(str(tmp_path / "toy.onnx")).run(None, {"input_ids": ids})[0][0]
    from bitsmith.compiler.reference import ReferenceSession

    session = ReferenceSession(loaded.module, loaded.weights, 8)
    np.testing.assert_allclose(session.prefill([3, 1, 4]), ref[:3], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(session.decode(1), ref[3], rtol=1e-5, atol=1e-5)


def test_unsupported_op_is_named(tmp_path):
    onnx.save(_toy_graph("Erf"), tmp_path / "toy.onnx")
    with pytest.raises(BitsmithError, match="ONNX op Erf"):
        load_onnx(tmp_path / "toy.onnx")


def test_corrupt_or_truncated_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x08\x07garbage\xff\xfe" * 10)
    with pytest.raises(BitsmithError, match="bad.onnx"):
        load_onnx(bad)
    whole = _toy_graph("Tanh").SerializeToString()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(BitsmithError, match="cut.onnx"):
        load_onnx(cut)
