"""Mixture-of-experts IR ops: `topk`, `sum`, the `router` (top-k over softmax or logits) and the expert MLPs `moe` / `qmoe`."""

from __future__ import annotations

import numpy as np

from bitsmith.compiler.ir import TensorType
from bitsmith.compiler.ops.quant import dequantize_packed
from bitsmith.compiler.ops.registry import COMPUTE_DTYPE, as_float, axis_index, check, register
from bitsmith.runtime.packed_layout import packed_shape

# Expert weights are one stacked tensor per projection (the transformers 5 layout):
#   gate_up[e, 2I, H]: rows [0, I) the gate, rows [I, 2I) the up projection of expert e
#   down[e, H, I]
# A token's output: y[t] = sum_j w[t, j] * down[i_j] @ (act(gate[i_j] @ x[t]) * (up[i_j] @ x[t])), i_j = idx[t, j].
ACTS = ("silu",)
SCORINGS = ("softmax", "logits")


def _topk_infer(in_types, attrs, weights):
    x = in_types[0]
    check(isinstance(x.shape[-1], int) and 0 < attrs["k"] <= x.shape[-1], f"top-{attrs['k']} of {x.shape}")
    shape = x.shape[:-1] + (attrs["k"],)
    return [TensorType(shape, COMPUTE_DTYPE), TensorType(shape, "int64")]


def topk_last(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k largest values along the last axis, largest first; ties go to the lower index (as torch.topk on CPU)."""
    idx = np.argsort(-x, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(x, idx, axis=-1), idx.astype(np.int64)


register("topk", (1, 1), _topk_infer, lambda xs, a, c: list(topk_last(as_float(xs[0]), a["k"])))


def _sum_infer(in_types, attrs, weights):
    shape = in_types[0].shape
    axes = {axis_index(a, len(shape)) for a in attrs["axes"]}
    out = tuple(1 if i in axes else d for i, d in enumerate(shape) if attrs.get("keepdim", False) or i not in axes)
    return [TensorType(out, in_types[0].dtype)]


register("sum", (1, 1), _sum_infer,
         lambda xs, a, c: [np.sum(xs[0], axis=tuple(a["axes"]), keepdims=a.get("keepdim", False))])


# router(logits[seq, E]) -> (weights f32[seq, k], experts int64[seq, k]); attrs top_k, scoring, normalize:
#   scoring softmax: p = softmax(logits), top-k of p; logits: top-k of the logits themselves
#   normalize: the k weights divided by their sum (Mixtral always; Qwen3-MoE / OLMoE when norm_topk_prob)
def _router_infer(in_types, attrs, weights):
    logits = in_types[0]
    check(logits.rank == 2 and isinstance(logits.shape[1], int), f"router logits must be [seq, experts], got {logits.shape}")
    check(attrs["scoring"] in SCORINGS, f"router scoring {attrs['scoring']!r} (one of {SCORINGS})")
    check(0 < attrs["top_k"] <= logits.shape[1], f"top_k {attrs['top_k']} of {logits.shape[1]} experts")
    shape = (logits.shape[0], attrs["top_k"])
    return [TensorType(shape, COMPUTE_DTYPE), TensorType(shape, "int64")]


def route(logits: np.ndarray, top_k: int, scoring: str, normalize: bool) -> tuple[np.ndarray, np.ndarray]:
    scores = logits.astype(np.float32)
    if scoring == "softmax":
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        scores /= scores.sum(axis=-1, keepdims=True)
    values, idx = topk_last(scores, top_k)
    if normalize:
        values = values / values.sum(axis=-1, keepdims=True)
    return values.astype(np.float32), idx


register("router", (1, 1), _router_infer,
         lambda xs, a, c: list(route(as_float(xs[0]), a["top_k"], a["scoring"], a.get("normalize", False))))


def _check_routing(x: TensorType, w: TensorType, idx: TensorType) -> None:
    check(x.rank == 2, f"moe input must be [seq, hidden], got {x.shape}")
    check(w.rank == 2 and w.shape == idx.shape and w.shape[0] == x.shape[0],
          f"moe routing weights {w.shape} / experts {idx.shape} do not match input {x.shape}")
    check(idx.dtype in ("int64", "int32"), f"moe expert indices must be integers, got {idx.dtype}")


def _moe_infer(in_types, attrs, weights):
    x, w, idx, gate_up, down = in_types
    _check_routing(x, w, idx)
    check(gate_up.rank == 3 and down.rank == 3, f"stacked expert weights must be 3-D, got {gate_up.shape} {down.shape}")
    e, two_i, h = gate_up.shape
    check(h == x.shape[1] and two_i % 2 == 0, f"gate_up {gate_up.shape} does not fit hidden {x.shape[1]}")
    check(down.shape == (e, h, two_i // 2), f"down {down.shape} != ({e}, {h}, {two_i // 2})")
    check(attrs.get("act", "silu") in ACTS, f"expert activation {attrs.get('act')!r} (one of {ACTS})")
    return [TensorType(x.shape, COMPUTE_DTYPE)]


def _silu(x: np.ndarray) -> np.ndarray:
    return x / (np.float32(1) + np.exp(-x))


def moe_reference(x: np.ndarray, w: np.ndarray, idx: np.ndarray, expert) -> np.ndarray:
    """sum over a token's chosen experts of w * expert(e)(x rows); `expert(e)` gives (gate_up[2I, H], down[H, I])
    as float32. Only the chosen experts are read (rows grouped by expert)."""
    y = np.zeros_like(x)
    for e in np.unique(idx):
        rows, slot = np.nonzero(idx == e)
        gate_up, down = expert(int(e))
        gu = x[rows] @ gate_up.T
        inter = gu.shape[1] // 2
        h = _silu(gu[:, :inter]) * gu[:, inter:]
        np.add.at(y, rows, (h @ down.T) * w[rows, slot][:, None])
    return y


def _moe_ref(xs, attrs, ctx):
    x, w, idx, gate_up, down = xs
    return [moe_reference(as_float(x), as_float(w), idx, lambda e: (as_float(gate_up[e]), as_float(down[e])))]


register("moe", (5, 5), _moe_infer, _moe_ref)

# qmoe(x, w, idx, gu_q uint32[E, 2I, words], gu_s f16[E, 2I, groups], (gu_z), dn_q, dn_s, (dn_z))
#   each expert slice e is quantized alone, exactly as a qlinear weight (compiler/ops/quant.py);
#   attrs: bits, group_size, sym, hidden, inter, experts, act


def _qmoe_params(attrs: dict) -> int:
    return 2 if attrs["sym"] else 3


def _qmoe_infer(in_types, attrs, weights):
    x, w, idx = in_types[:3]
    _check_routing(x, w, idx)
    n = _qmoe_params(attrs)
    check(len(in_types) == 3 + 2 * n, f"qmoe expects {3 + 2 * n} inputs, got {len(in_types)}")
    e, h, inter = attrs["experts"], attrs["hidden"], attrs["inter"]
    check(x.shape[1] == h, f"qmoe input has {x.shape[1]} features, experts expect {h}")
    for (n_out, n_in), (q, s) in zip(((2 * inter, h), (h, inter)), (in_types[3:5], in_types[3 + n:5 + n])):
        check(q.dtype == "uint32" and q.shape == (e,) + packed_shape(n_out, n_in, attrs["bits"]),
              f"packed experts {q} do not hold {e} x {n_out}x{n_in} {attrs['bits']}-bit codes")
        group = n_in if attrs["group_size"] == -1 else attrs["group_size"]
        check(s.shape == (e, n_out, -(-n_in // group)), f"expert scales {s.shape} for {e} x {n_out}x{n_in}")
    return [TensorType(x.shape, COMPUTE_DTYPE)]


def _qmoe_ref(xs, attrs, ctx):
    x, w, idx = xs[:3]
    n = _qmoe_params(attrs)
    gu, dn = xs[3:3 + n], xs[3 + n:3 + 2 * n]
    h, inter = attrs["hidden"], attrs["inter"]

    def deq(params, e, n_in):
        return dequantize_packed(params[0][e], params[1][e], None if attrs["sym"] else params[2][e],
                                 {**attrs, "in_features": n_in})

    return [moe_reference(as_float(x), as_float(w), idx, lambda e: (deq(gu, e, h), deq(dn, e, inter)))]


register("qmoe", (7, 9), _qmoe_infer, _qmoe_ref)
