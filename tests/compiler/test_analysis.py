"""networkx analyses: topological order, dead-code elimination, liveness."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.analysis import dead_code_elimination, liveness, to_networkx, topological_order
from bitsmith.compiler.builder import FunctionBuilder
from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.reference import run_function


def _function():
    b = FunctionBuilder("f", {"w": TensorType((3, 4), "float32")})
    x = b.input("x", TensorType(("seq", 4), "float32"))
    y = b.op("linear", [x, b.weight("w")], hint="y")
    dead = b.op("silu", [y], hint="dead")
    b.op("mul", [dead, dead], hint="dead2")
    z = b.op("neg", [y], hint="z")
    return b.finish([z])


def test_dead_code_elimination_removes_only_dead_nodes():
    fn = _function()
    pruned = dead_code_elimination(fn)
    assert [n.op for n in pruned.nodes] == ["weight", "linear", "neg"]
    assert not any(k.startswith("dead") for k in pruned.types)
    weights = {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}
    x = {"x": np.ones((2, 4), np.float32)}
    np.testing.assert_array_equal(run_function(fn, weights, x)[0], run_function(pruned, weights, x)[0])


def test_topological_order_repairs_shuffled_nodes():
    fn = _function()
    shuffled = fn.replace(nodes=tuple(reversed(fn.nodes)))
    ordered = topological_order(shuffled)
    seen = {n for n, _ in fn.inputs}
    for node in ordered.nodes:
        assert set(node.inputs) <= seen
        seen |= set(node.outputs)


def test_liveness_intervals():
    fn = dead_code_elimination(_function())
    live = liveness(fn)
    w, y, z = (n.outputs[0] for n in fn.nodes)
    assert live["x"] == (-1, 1) and live[w] == (0, 1) and live[y] == (1, 2)
    assert live[z] == (2, len(fn.nodes))  # outputs stay live to the end
    assert to_networkx(fn).number_of_edges() == 3
