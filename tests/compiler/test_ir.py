"""IR: JSON round trip, stable printing, verifier errors that name the node, symbolic shape inference."""

from __future__ import annotations

import dataclasses
import json

import pytest

from bitsmith.compiler.config import ModelConfig
from bitsmith.compiler.frontends.llama import build_llama_module
from bitsmith.compiler.builder import FunctionBuilder
from bitsmith.compiler.ir import Module, Node, TensorType
from bitsmith.compiler.ops import reshape_dims
from bitsmith.compiler.printer import print_module
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError

CONFIG = ModelConfig(architecture="qwen2", vocab_size=50, hidden_size=32, intermediate_size=48, num_layers=2,
                     num_heads=4, num_kv_heads=2, head_dim=8, attention_bias=True, qk_norm=True,
                     rope_scaling={"rope_type": "linear", "factor": 2.0})


@pytest.fixture
def module() -> Module:
    return build_llama_module(CONFIG, {})


def test_json_round_trip_is_lossless(module):
    text = json.dumps(module.to_json())
    again = Module.from_json(json.loads(text))
    assert again == module
    assert print_module(again) == print_module(module)
    assert json.dumps(again.to_json()) == text


def test_printer_is_stable_and_names_ops(module):
    text = print_module(module)
    assert text == print_module(build_llama_module(CONFIG, {}))
    assert "func @prefill(%tokens: int64[seq], %positions: int64[seq], %kv_cache: float32[2, 2, ctx, 2, 8])" in text
    assert "= attention(" in text and "{layer=0" in text


def test_verifier_accepts_built_module(module):
    verify_module(module)


def _replace_node(module: Module, index: int, node: Node) -> Module:
    fn = module["prefill"]
    nodes = list(fn.nodes)
    nodes[index] = node
    return module.with_function(fn.replace(nodes=tuple(nodes)))


def _find(module: Module, op: str) -> tuple[int, Node]:
    return next((i, n) for i, n in enumerate(module["prefill"].nodes) if n.op == op)


def test_verifier_rejects_use_before_definition(module):
    index, node = _find(module, "linear")
    bad = _replace_node(module, index, dataclasses.replace(node, inputs=("nowhere",) + node.inputs[1:]))
    with pytest.raises(BitsmithError, match=rf"node #{index} %{node.name} \(linear\).*%nowhere before"):
        verify_module(bad)


def test_verifier_rejects_wrong_recorded_type(module):
    index, node = _find(module, "rmsnorm")
    fn = module["prefill"]
    types = dict(fn.types)
    types[node.outputs[0]] = TensorType(("seq", 31), "float32")
    bad = module.with_function(fn.replace(types=types))
    with pytest.raises(BitsmithError, match=rf"%{node.name} is typed float32\[seq, 31\]"):
        verify_module(bad)


def test_verifier_rejects_unknown_op_and_missing_weight(module):
    index, node = _find(module, "silu")
    with pytest.raises(BitsmithError, match=r"unknown op 'swish'"):
        verify_module(_replace_node(module, index, dataclasses.replace(node, op="swish")))
    index, node = _find(module, "weight")
    bad = _replace_node(module, index, dataclasses.replace(node, attrs={"name": "no.such.weight"}))
    with pytest.raises(BitsmithError, match=r"no.such.weight"):
        verify_module(bad)


def test_verifier_rejects_shape_mismatch_inside_op(module):
    index, node = _find(module, "linear")
    swapped = dataclasses.replace(node, inputs=("positions", node.inputs[1]))
    with pytest.raises(BitsmithError, match=r"\(linear\).*linear input has seq features"):
        verify_module(_replace_node(module, index, swapped))


def test_builder_names_node_on_bad_shapes():
    b = FunctionBuilder("f", {"w": TensorType((8, 5), "float32")})
    x = b.input("x", TensorType(("seq", 4), "float32"))
    with pytest.raises(BitsmithError, match=r"f/proj: linear: linear input has 4 features, weight expects 5"):
        b.op("linear", [x, b.weight("w")], hint="proj")


@pytest.mark.parametrize("src,target,expected", [
    (("seq", 128), (-1, 8, 16), ("seq", 8, 16)),
    (("seq", 8, 16), ("seq", -1), ("seq", 128)),
    ((1, 8, 16), (-1,), (128,)),
    (("seq", 4), (2, -1, 2), (2, "seq", 2)),
])
def test_symbolic_reshape(src, target, expected):
    assert reshape_dims(src, target) == expected


@pytest.mark.parametrize("src,target", [(("seq", 128), (-1, 7)), (("seq", "ctx"), (-1,)), ((6,), (-1, -1))])
def test_symbolic_reshape_rejects_impossible(src, target):
    from bitsmith.compiler.ops import ShapeError

    with pytest.raises(ShapeError):
        reshape_dims(src, target)
