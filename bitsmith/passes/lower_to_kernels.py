"""lower_to_kernels: each entry point becomes a schedule of compiled kernel calls with a liveness buffer plan."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import networkx as nx
import numpy as np

from bitsmith.codegen import families as k
from bitsmith.codegen.spec_checks import DENSE_DTYPE_BITS
from bitsmith.codegen.target import Target, resolve_target, weight_dtype
from bitsmith.compiler.analysis import topological_order
from bitsmith.compiler.ir import Function, Module, Node, TensorType
from bitsmith.compiler.ops.llm import rope_inv_freq
from bitsmith.errors import BitsmithError
from bitsmith.passes.base import Lowered, PassContext
from bitsmith.passes.kv_plan import KVPlan
from bitsmith.passes.lower_hadamard import hadamard_prologues, lower_hadamard
from bitsmith.passes.lower_linear import GEMM_MIN_ROWS, lower_linear  # noqa: F401 (GEMM_MIN_ROWS re-exported)
from bitsmith.passes.lower_moe import MOE_OPS, lower_moe
from bitsmith.passes.manager import Pass
from bitsmith.runtime.arena import round_up
from bitsmith.runtime.kv_cache import ring_blocks_needed
from bitsmith.runtime.schedule import BufferSlot, KernelCall, Schedule

PREFILL_ROWS = 64  # prefill runs in chunks of this many tokens (the last one padded)


def _prod(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class _Lowering:
    """State while one function is lowered: calls so far, buffer types, aliases, the specs used."""

    fn: Function
    rows: int
    kv_plan: KVPlan
    specs: dict[str, Any]
    constants: dict[str, dict[str, Any]]
    int8_activations: bool = False
    target: Target | None = None  # every emitted spec must be one it builds
    # weight -> why its matmul keeps float32 activations although int8 ones were allowed (lower_linear)
    float_activations: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.node: Node | None = None  # the node being lowered (named when its kernel is refused)
        self.calls: list[KernelCall] = []
        self.types: dict[str, TensorType] = {}
        self.alias: dict[str, str] = {}  # reshape output -> the buffer it views
        self.cache_values: set[str] = set()
        self.consts: dict[str, Node] = {}  # const nodes: compile-time scalars of the kernels that read them
        self.users: dict[str, list[int]] = {}
        for index, node in enumerate(self.fn.nodes):
            for value in node.inputs:
                self.users.setdefault(value, []).append(index)
        self.producer = {v: i for i, node in enumerate(self.fn.nodes) for v in node.outputs}
        self.weight_of = {node.outputs[0]: node.attrs["name"] for node in self.fn.nodes if node.op == "weight"}
        # silu nodes folded into the mul that is their only user (emitted there, as silu_mul)
        self.fused: set[int] = set()
        for node in self.fn.nodes:
            if node.op == "mul" and (silu := _silu_partner(self, node)) is not None:
                self.fused.add(silu)
        self.prologues = hadamard_prologues(self)  # hadamard index -> the silu*up or rope fused into it

    def silu_partner(self, node: Node) -> int | None:
        return _silu_partner(self, node)

    # ------------------------------------------------------------------ values
    def shape(self, value: str) -> tuple[int, ...]:
        binding = {"seq": self.rows, "ctx": self.kv_plan.max_context}
        return tuple(binding[d] if isinstance(d, str) else d for d in self.fn.types[value].shape)

    def arg(self, value: str, shape: tuple[int, ...] | None = None) -> tuple[Any, ...]:
        """A call argument; buffers are viewed with the kernel's `shape` (default: the value's own)."""
        if value in self.weight_of:
            return ("weight", self.weight_of[value])
        if value in self.consts:
            raise self.unsupported(self.consts[value], f"is read as a tensor by op {self.node.op if self.node else '?'}"
                                   " (only a one-element const folds into a kernel)")
        return ("buffer", self.alias.get(value, value), tuple(shape or self.shape(value)))

    def define(self, value: str, dtype: str = "float32", shape: tuple[int, ...] | None = None) -> tuple[Any, ...]:
        self.types[value] = TensorType(self.shape(value), dtype)
        return ("buffer", value, tuple(shape or self.shape(value)))

    def flat(self, value: str) -> tuple[int]:
        return (_prod(self.shape(value)),)

    def rows_dim(self, value: str) -> tuple[int, int]:
        shape = self.shape(value)
        return (_prod(shape[:-1]), shape[-1])

    def weight_dtype(self, value: str, where: Node) -> str:
        name = self.weight_of.get(value)
        if name is None:
            raise self.unsupported(where, f"expects a weight as input {value}")
        return self.fn.types[value].dtype

    def emit(self, spec: Any, args: list[tuple[str, Any]], value: str) -> None:
        if self.target is not None:
            try:
                self.target.check(spec)
            except BitsmithError as exc:
                raise self.refused(spec, args, exc) from exc
        self.specs[spec.name] = spec
        self.calls.append(KernelCall(spec.name, tuple(args), value))

    def unsupported(self, node: Node, detail: str = "has no compiled kernel") -> BitsmithError:
        return BitsmithError(f"op {node.op} ({node.outputs[0]}) {detail}", where=f"pass lower_to_kernels, {self.fn.name}",
                             fix="compile with `--target none` and run with `--executor reference`")

    def refused(self, spec: Any, args: list[tuple[str, Any]], exc: BitsmithError) -> BitsmithError:
        """The target cannot build the kernel of the node being lowered: name the op, the weights it reads, their
        stored dtype and the way out (a dense dtype the target reads, else the reference executor)."""
        node, target = self.node, self.target
        dtype = weight_dtype(spec)
        weights = [ref for kind, ref, *_ in args if kind == "weight"]
        what = f", weights {', '.join(weights)} stored as {dtype}" if weights else ""
        readable = [d for d in DENSE_DTYPE_BITS if target is not None and d in target.weight_dtypes]
        if dtype in DENSE_DTYPE_BITS and dtype not in readable and readable:
            fix = f"compile with `--dtype {readable[0]}` (target {target.name} reads {', '.join(readable)} weights)"
        else:
            fix = exc.fix or "pick another target"
        return BitsmithError(f"op {node.op} ({node.outputs[0]}{what}) has no kernel on target "
                             f"{target.name if target else '?'}: {exc.problem}",
                             where=f"pass lower_to_kernels, {self.fn.name}",
                             fix=f"{fix}; or compile with `--target none` and run with `--executor reference`")

    def constant(self, prefix: str, values: np.ndarray) -> tuple[str, str]:
        data = np.ascontiguousarray(values, dtype=np.float32)
        name = f"{prefix}_{hashlib.sha256(data.tobytes()).hexdigest()[:12]}"
        self.constants[name] = {"dtype": "float32", "shape": list(data.shape), "values": data.tolist()}
        return ("const", name)


def _scalar_const(st: _Lowering, value: str) -> float | None:
    """The float of a one-element `const` node, else None."""
    node = st.consts.get(value)
    values = np.asarray(node.attrs["value"], dtype=np.float64).reshape(-1) if node is not None else ()
    return float(values[0]) if len(values) == 1 else None


def _lower_slice(st: _Lowering, node: Node) -> None:
    """A strided slice along one axis as a copy of [outer, axis, inner] rows (fused qkv / gate-up splits)."""
    a, x, out = node.attrs, node.inputs[0], node.outputs[0]
    shape = st.shape(x)
    axis = a["axis"] % len(shape)
    picked = range(*slice(a["start"], a["end"], a.get("step", 1)).indices(shape[axis]))
    if len(picked) == 0 or picked.step < 0:
        raise st.unsupported(node, f"selects {len(picked)} elements with step {picked.step}")
    outer, inner = _prod(shape[:axis]), _prod(shape[axis + 1:])
    spec = k.SliceSpec(outer, shape[axis], inner, picked.start, len(picked), picked.step)
    st.emit(spec, [st.arg(x, (outer, shape[axis], inner)), st.define(out, shape=(outer, len(picked), inner))], out)


def _lower_node(st: _Lowering, index: int, node: Node) -> None:
    op, ins, out = node.op, node.inputs, node.outputs[0]
    a = node.attrs
    if op == "weight":
        pass  # weights are arguments, registered up front in _Lowering.weight_of
    elif op == "reshape":
        st.alias[out] = st.alias.get(ins[0], ins[0])
    elif op == "embedding":
        vocab, dim = st.fn.types[ins[0]].shape
        spec = k.EmbeddingSpec(st.rows, vocab, dim, st.weight_dtype(ins[0], node))
        st.emit(spec, [st.arg(ins[0]), st.arg(ins[1]), st.define(out)], out)
    elif op in ("rmsnorm", "layernorm"):
        dim = st.shape(ins[0])[-1]
        rows = _prod(st.shape(ins[0])[:-1])
        if len(ins) < 2:
            raise st.unsupported(node, "without a weight has no compiled kernel")
        wdt = st.weight_dtype(ins[1], node)
        spec = (k.RmsNormSpec(rows, dim, wdt, float(a["eps"])) if op == "rmsnorm"
                else k.LayerNormSpec(rows, dim, wdt, float(a["eps"]), len(ins) > 2))
        st.emit(spec, [st.arg(ins[0], (rows, dim)), *[st.arg(v) for v in ins[1:]], st.define(out, shape=(rows, dim))],
                out)
    elif op in ("linear", "qlinear"):
        lower_linear(st, node)
    elif op == "hadamard":
        lower_hadamard(st, index, node)
    elif op in MOE_OPS:
        lower_moe(st, node)
    elif op == "rope":
        rows, heads, hd = st.shape(ins[0])
        rot = a.get("rotary_dim", hd)
        spec = k.RopeSpec(rows, heads, hd, rot, a.get("style", "half"))
        table = st.constant("rope_inv_freq", rope_inv_freq(rot, a["theta"], a.get("scaling")))
        st.emit(spec, [st.arg(ins[0]), st.arg(ins[1]), table, st.define(out)], out)
    elif op == "attention":
        rows, heads, hd = st.shape(ins[0])
        kv = st.shape(ins[1])[1]
        plan, layer = st.kv_plan, a["layer"]
        kv_dtype = plan.layer_dtypes[layer]
        ring = plan.ring_layer(layer)  # a windowed layer on its ring pool, read through the ring tables
        spec = k.PagedAttentionSpec(rows, heads, kv, hd, plan.block_size, plan.layer_blocks(layer), plan.max_blocks,
                                    float(a["scale"]), a.get("sliding_window") or None, kv_dtype,
                                    a.get("softcap") or None, plan.ring_blocks if ring else None)
        tables = ("buffer", "ring_tables", (rows, plan.ring_blocks)) if ring else \
            ("buffer", "block_tables", (rows, plan.max_blocks))
        st.cache_values.add(node.outputs[1])
        scales = [("kv_scales", layer)] if kv_dtype in ("int8", "int4") else []
        st.emit(spec, [st.arg(ins[0]), st.arg(ins[1]), st.arg(ins[2]), st.arg(ins[3]),
                       tables, ("cache", layer), *scales,
                       st.define(out)], out)
    elif op == "mul" and (silu := _silu_partner(st, node)) is not None:
        gate = st.fn.nodes[silu].inputs[0]
        other = next(v for v in ins if v != st.fn.nodes[silu].outputs[0])
        n = st.flat(out)
        st.emit(k.SiluMulSpec(n[0]), [st.arg(gate, n), st.arg(other, n), st.define(out, shape=n)], out)
    elif op == "const":
        st.consts[out] = node  # read only by the kernels that take it as a compile-time scalar (below)
    elif op == "slice":
        _lower_slice(st, node)
    elif op in ("add", "sub", "mul", "div") and any(_scalar_const(st, v) is not None for v in ins):
        first = _scalar_const(st, ins[0]) is not None
        x = ins[1] if first else ins[0]
        n = st.flat(out)
        if st.shape(x) != st.shape(out):
            raise st.unsupported(node, f"broadcasts {st.shape(x)} to {st.shape(out)}")
        spec = k.ScalarSpec(n[0], op, _scalar_const(st, ins[0] if first else ins[1]), first)
        st.emit(spec, [st.arg(x, n), st.define(out, shape=n)], out)
    elif op in ("silu", "gelu", "relu", "tanh"):
        kind = "gelu_tanh" if op == "gelu" and a.get("approximate", "none") == "tanh" else op
        n = st.flat(out)
        st.emit(k.UnarySpec(n[0], kind), [st.arg(ins[0], n), st.define(out, shape=n)], out)
    elif op in ("add", "mul"):
        if st.shape(ins[0]) != st.shape(ins[1]):
            raise st.unsupported(node, f"broadcasts {st.shape(ins[0])} with {st.shape(ins[1])}")
        norm_index = _add_norm_partner(st, out) if op == "add" else None
        if norm_index is not None:
            norm = st.fn.nodes[norm_index]
            st.fused.add(norm_index)
            rd = st.rows_dim(out)
            spec = k.AddRmsNormSpec(rd[0], rd[1], st.weight_dtype(norm.inputs[1], norm), float(norm.attrs["eps"]))
            st.emit(spec, [st.arg(ins[0], rd), st.arg(ins[1], rd), st.arg(norm.inputs[1]), st.define(out, shape=rd),
                           st.define(norm.outputs[0], shape=rd)], norm.outputs[0])
        else:
            n = st.flat(out)
            st.emit(k.BinarySpec(n[0], op), [st.arg(ins[0], n), st.arg(ins[1], n), st.define(out, shape=n)], out)
    else:
        raise st.unsupported(node)


def _silu_partner(st: _Lowering, node: Node) -> int | None:
    """The silu feeding this mul (its only user, same shape): the pair becomes one silu_mul (SwiGLU)."""
    for value in node.inputs:
        producer = st.producer.get(value)
        if (producer is not None and st.fn.nodes[producer].op == "silu" and len(st.users.get(value, [])) == 1
                and st.shape(value) == st.shape(node.outputs[0])
                and value not in st.fn.outputs and len(set(node.inputs)) == 2):
            return producer
    return None


def _add_norm_partner(st: _Lowering, value: str) -> int | None:
    """The rmsnorm right after this add (same row layout, with a weight): fused as add+rmsnorm."""
    for user in st.users.get(value, []):
        node = st.fn.nodes[user]
        if node.op == "rmsnorm" and node.inputs[0] == value and len(node.inputs) == 2:
            return user
    return None


def plan_buffers(calls: list[KernelCall], types: dict[str, TensorType], pinned: set[str]) -> tuple[dict[str, BufferSlot], int]:
    """Arena offsets so that buffers alive at the same time never overlap.

    Lifetimes run from the first call that touches a buffer to the last; `pinned` buffers (the
    step's inputs and output) live for the whole step. Buffers are the nodes of a networkx
    interference graph (an edge: lifetimes overlap); placed largest first at the lowest 64-byte
    aligned offset that clears every placed neighbour (first fit).
    """
    first: dict[str, int] = {}
    last: dict[str, int] = {}
    for index, call in enumerate(calls):
        for kind, ref, *_ in call.args:
            if kind == "buffer":
                first.setdefault(ref, index)
                last[ref] = index
    for name in pinned:
        first[name], last[name] = -1, len(calls)
    graph = nx.Graph()
    graph.add_nodes_from(first)
    names = sorted(first, key=lambda n: first[n])
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if first[b] > last[a]:
                break
            graph.add_edge(a, b)
    size = {n: round_up(_prod(types[n].shape) * np.dtype(types[n].dtype).itemsize) for n in first}
    offsets: dict[str, int] = {}
    for name in sorted(first, key=lambda n: (-size[n], first[n], n)):
        taken = sorted((offsets[m], offsets[m] + size[m]) for m in graph.neighbors(name) if m in offsets)
        offset = 0
        for lo, hi in taken:
            if offset + size[name] <= lo:
                break
            offset = max(offset, hi)
        offsets[name] = offset
    total = max((offsets[n] + size[n] for n in offsets), default=0)
    return {n: BufferSlot(offsets[n], tuple(types[n].shape), types[n].dtype) for n in sorted(offsets)}, total


def lower_function(fn: Function, rows: int, kv_plan: KVPlan, specs: dict[str, Any],
                   constants: dict[str, dict[str, Any]], int8_activations: bool = False,
                   target: Target | str = "host", float_activations: dict[str, str] | None = None) -> Schedule:
    """The schedule of `fn` with seq bound to `rows`, attention reading the paged pools of `kv_plan`;
    `float_activations` collects the weights kept on float32 activations although int8 ones were allowed."""
    fn = topological_order(fn)
    st = _Lowering(fn, rows, kv_plan, specs, constants, int8_activations, resolve_target(target),
                   {} if float_activations is None else float_activations)
    names = [n for n, _ in fn.inputs]
    if names != ["tokens", "positions", "kv_cache"] or len(fn.outputs) != 2:
        raise BitsmithError(f"entry {fn.name} has inputs {names} and {len(fn.outputs)} outputs",
                            where="pass lower_to_kernels",
                            fix="entry points take (tokens, positions, kv_cache) and return (logits, kv_cache)")
    st.define("tokens", "int64")
    st.define("positions", "int64")
    st.types["block_tables"] = TensorType((rows, kv_plan.max_blocks), "int32")
    tables = {"block_tables": "block_tables"}
    if kv_plan.ring_blocks:  # windowed layers' ring tables [rows, ring_blocks] (kv_plan.py)
        st.types["ring_tables"] = TensorType((rows, kv_plan.ring_blocks), "int32")
        tables["ring_tables"] = "ring_tables"
    st.cache_values.add("kv_cache")
    first_call: dict[int, int] = {}  # node index -> index of its first call
    for index, node in enumerate(fn.nodes):
        if index not in st.fused:
            first_call[index] = len(st.calls)
            st.node = node
            _lower_node(st, index, node)
    logits = st.alias.get(fn.outputs[0], fn.outputs[0])
    if logits not in st.types:
        raise BitsmithError(f"logits of {fn.name} are not computed by a kernel", where="pass lower_to_kernels",
                            fix="compile with `--target none` and run with `--executor reference`")
    hidden, head_from = _logits_head(st, first_call, logits)
    inputs = {"tokens": "tokens", "positions": "positions", **tables}
    buffers, arena = plan_buffers(st.calls, st.types, {"tokens", "positions", *tables, logits})
    return Schedule(fn.name, rows, kv_plan.max_context, arena, buffers, inputs, logits, tuple(st.calls),
                    hidden, head_from)


def _logits_head(st: _Lowering, first_call: dict[int, int], logits: str) -> tuple[str, int]:
    """(hidden buffer, index of the first head call) when the schedule ends with the lm_head: one
    linear from a row-wise hidden state to the logits. The runtime then runs the head only for the
    rows it samples (a 64-row prefill chunk samples at most one, and a large vocabulary's lm_head is much
    of such a chunk's work). ("", len(calls)) when the logits come some other way (no split)."""
    none = ("", len(st.calls))
    producer = st.producer.get(st.fn.outputs[0])
    while producer is not None and st.fn.nodes[producer].op == "reshape":
        producer = st.producer.get(st.fn.nodes[producer].inputs[0])
    if producer is None or st.fn.nodes[producer].op not in ("linear", "qlinear") or producer not in first_call:
        return none
    head_from = first_call[producer]
    hidden = st.alias.get(st.fn.nodes[producer].inputs[0], st.fn.nodes[producer].inputs[0])
    head = st.calls[head_from:]
    if hidden not in st.types or any(c.value not in (logits, f"{logits}.nobias") for c in head):
        return none
    return hidden, head_from


@dataclass(frozen=True)
class LowerToKernels(Pass):
    """Lower the entry points to kernel schedules, one per row count: `decode` (1 row) and `prefill`
    at each of `batch_rows` (prefill chunks, and batched steps mixing several sequences' tokens).

    Needs module.meta["kv_plan"] (the plan_kv_cache pass). The result goes to ctx.lowered (specs,
    schedules "rows<N>", constant tables, the KV plan); the module itself is unchanged.
    """

    int8_activations: bool = False  # 4/8-bit GEMVs may quantize x to int8 per 32 values, where the target can
    target: str = "host"  # the codegen target (host, aarch64-linux, cuda_<arch>): the kernels it builds
    # decode batches of 4/16, and 32 for a 16-sequence batch with a prefill chunk, without 64-row padding
    batch_rows: tuple[int, ...] = (4, 16, 32, PREFILL_ROWS)
    name = "lower_to_kernels"
    requires = frozenset({"kv_planned"})
    provides = frozenset({"lowered"})

    def run(self, module: Module, ctx: PassContext) -> Module:
        if "kv_plan" not in module.meta:
            raise BitsmithError("the module has no KV plan", where="pass lower_to_kernels",
                                fix="run plan_kv_cache before lower_to_kernels")
        plan = KVPlan.from_json(module.meta["kv_plan"])
        windows = [w for w in plan.layer_windows if w]
        if plan.ring_blocks and ring_blocks_needed(max(windows), max(self.batch_rows), plan.block_size) > plan.ring_blocks:
            raise BitsmithError(f"steps of {max(self.batch_rows)} rows overrun the windowed layers' ring of "
                                f"{plan.ring_blocks} blocks (planned for window {max(windows)})",
                                where="pass lower_to_kernels",
                                fix=f"plan the KV cache with KVPlanOptions(chunk_rows={max(self.batch_rows)})")
        specs: dict[str, Any] = {}
        constants: dict[str, dict[str, Any]] = {}
        # every op must get a kernel: an artifact without kernels is asked for (--target none), never a fallback
        target = resolve_target(self.target)
        i8 = self.int8_activations and target.supports_int8_activations
        floats: dict[str, str] = {}
        schedules = {"rows1": lower_function(module["decode"], 1, plan, specs, constants, i8, target, floats)}
        for rows in self.batch_rows:
            schedules[f"rows{rows}"] = lower_function(module["prefill"], rows, plan, specs, constants, i8, target,
                                                      floats)
        ctx.lowered = Lowered(specs, schedules, constants, plan.to_json(), floats)
        return module
