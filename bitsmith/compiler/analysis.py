"""networkx views of a function and the analyses built on them: order, dead code, liveness, weight uses."""

from __future__ import annotations

import networkx as nx

from bitsmith.compiler.ir import Function, Module


def to_networkx(fn: Function) -> nx.DiGraph:
    """Nodes are node indices (plus "in:<name>" for inputs); an edge carries the value it moves."""
    graph = nx.DiGraph()
    producer: dict[str, int | str] = {}
    for name, _ in fn.inputs:
        graph.add_node(f"in:{name}", op="input")
        producer[name] = f"in:{name}"
    for index, node in enumerate(fn.nodes):
        graph.add_node(index, op=node.op)
        producer.update({value: index for value in node.outputs})
    for index, node in enumerate(fn.nodes):
        for value in node.inputs:
            graph.add_edge(producer[value], index, value=value)
    graph.graph["producer"] = producer
    return graph


def topological_order(fn: Function) -> Function:
    """The same nodes in a deterministic topological order (ties broken by original position)."""
    graph = to_networkx(fn)
    order = nx.lexicographical_topological_sort(graph, key=lambda n: (isinstance(n, str), str(n).zfill(8)))
    return fn.replace(nodes=tuple(fn.nodes[n] for n in order if not isinstance(n, str)))


def dead_code_elimination(fn: Function) -> Function:
    """Drop every node no function output depends on; unused value types go too."""
    graph = to_networkx(fn)
    producer = graph.graph["producer"]
    live: set = set()
    for value in fn.outputs:
        source = producer[value]
        live.add(source)
        live |= nx.ancestors(graph, source)
    nodes = tuple(node for index, node in enumerate(fn.nodes) if index in live)
    used = {n for n, _ in fn.inputs} | {v for node in nodes for v in node.outputs}
    return fn.replace(nodes=nodes, types={k: t for k, t in fn.types.items() if k in used})


def liveness(fn: Function) -> dict[str, tuple[int, int]]:
    """value -> (index of the defining node or -1 for inputs, index of the last use; outputs live to the end)."""
    end = len(fn.nodes)
    intervals: dict[str, list[int]] = {name: [-1, -1] for name, _ in fn.inputs}
    for index, node in enumerate(fn.nodes):
        for value in node.inputs:
            intervals[value][1] = index
        for value in node.outputs:
            intervals[value] = [index, index]
    for value in fn.outputs:
        intervals[value][1] = end
    return {k: (v[0], v[1]) for k, v in intervals.items()}


def weight_uses(module: Module) -> dict[str, set[str]]:
    """Weight name -> every "op:slot" that reads it, over all functions (e.g. {"linear:1"}: only as a matrix)."""
    uses: dict[str, set[str]] = {}
    for fn in module.functions.values():
        producer = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        for node in fn.nodes:
            for slot, value in enumerate(node.inputs):
                if value in producer:
                    uses.setdefault(producer[value], set()).add(f"{node.op}:{slot}")
    return uses
