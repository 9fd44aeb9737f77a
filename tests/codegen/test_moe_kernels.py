"""MoE CPU kernels against the numpy references: the router, and the experts (dense and packed per expert)."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.codegen.kernel import call_kernel
from bitsmith.codegen.moe import MoeSpec, RouterSpec
from bitsmith.codegen.target import resolve_target
from bitsmith.compiler.ops import OPS, RefContext
from bitsmith.compiler.ops.moe import moe_reference, route
from bitsmith.errors import BitsmithError
from bitsmith.passes.quant.packing import pack
from bitsmith.passes.quant.rtn import quantize_rtn
from bitsmith.runtime.quant_scheme import QuantScheme

RTOL = 1e-5


@pytest.mark.parametrize("rows,experts,k,scoring,norm", [(1, 8, 2, "softmax", True), (5, 4, 2, "logits", False),
                                                          (3, 6, 3, "softmax", False)])
def test_router_kernel_matches_reference(rows, experts, k, scoring, norm):
    logits = np.random.default_rng(rows).standard_normal((rows, experts)).astype(np.float32)
    logits[0, 1] = logits[0, 2]  # a tie: the lower index wins in both
    w, idx = np.zeros((rows, k), np.float32), np.zeros((rows, k), np.int64)
    call_kernel(RouterSpec(rows, experts, k, scoring, norm), [logits], [w, idx])
    ref_w, ref_idx = route(logits, k, scoring, norm)
    np.testing.assert_array_equal(idx, ref_idx)
    np.testing.assert_allclose(w, ref_w, rtol=RTOL)


def _case(rows, experts, k, hidden, inter, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, hidden)).astype(np.float32)
    gate_up = rng.standard_normal((experts, 2 * inter, hidden)).astype(np.float32)
    down = rng.standard_normal((experts, hidden, inter)).astype(np.float32)
    w, idx = route(rng.standard_normal((rows, experts)).astype(np.float32), k, "softmax", True)
    return x, w, idx, gate_up, down


@pytest.mark.parametrize("rows,hidden,inter", [(1, 64, 32), (7, 48, 40)])  # 40, 48: not multiples of 16
def test_dense_moe_kernel_matches_reference(rows, hidden, inter):
    x, w, idx, gate_up, down = _case(rows, 4, 2, hidden, inter)
    y = np.zeros_like(x)
    call_kernel(MoeSpec(rows, 4, 2, hidden, inter), [x, w, idx, gate_up, down], [y])
    ref = moe_reference(x, w, idx, lambda e: (gate_up[e], down[e]))
    assert np.abs(y - ref).max() / np.abs(ref).max() < RTOL


def _quantize(stacked, scheme):
    """Each expert slice quantized alone (its own scales), the parts stacked: [E, out, words], [E, out, groups]."""
    qs = [quantize_rtn(w, scheme) for w in stacked]
    parts = [np.stack([pack(q.q, scheme.bits) for q in qs]), np.stack([q.scales for q in qs])]
    return parts + ([] if scheme.sym else [np.stack([q.zeros for q in qs])])


@pytest.mark.parametrize("bits,group,sym,rows,hidden,inter", [(8, -1, True, 1, 64, 32), (4, 32, False, 6, 160, 48),
                                                               (4, -1, True, 3, 128, 64), (2, 64, True, 2, 64, 64)])
def test_packed_moe_kernel_matches_reference(bits, group, sym, rows, hidden, inter):
    x, w, idx, gate_up, down = _case(rows, 4, 2, hidden, inter, seed=bits)
    scheme = QuantScheme(bits, group, sym, "rtn")
    params = _quantize(gate_up, scheme) + _quantize(down, scheme)
    attrs = dict(bits=bits, group_size=group, sym=sym, hidden=hidden, inter=inter, experts=4, act="silu")
    ref = OPS["qmoe"].ref([x, w, idx, *params], attrs, RefContext({}, {}))[0]
    y = np.zeros_like(x)
    call_kernel(MoeSpec(rows, 4, 2, hidden, inter, bits, group, sym), [x, w, idx, *params], [y])
    assert np.abs(y - ref).max() / np.abs(ref).max() < RTOL


def test_moe_kernels_are_refused_on_cuda():
    with pytest.raises(BitsmithError, match="builds no MoeSpec"):
        resolve_target("cuda_sm_90a").check(MoeSpec(1, 8, 2, 64, 32))
    with pytest.raises(BitsmithError, match="3-bit expert weights"):
        MoeSpec(1, 8, 2, 64, 32, bits=3)


def test_unchosen_experts_are_never_touched():
    """Decode reads only the chosen experts: with every other expert's weights NaN the output is still exact."""
    x, w, idx, gate_up, down = _case(1, 8, 2, 64, 32, seed=5)
    poisoned = [a.copy() for a in (gate_up, down)]
    for a in poisoned:
        a[np.setdiff1d(np.arange(8), idx[0])] = np.nan
    y = np.zeros_like(x)
    call_kernel(MoeSpec(1, 8, 2, 64, 32), [x, w, idx, *poisoned], [y])
    ref = moe_reference(x, w, idx, lambda e: (gate_up[e], down[e]))
    assert np.isfinite(y).all() and np.abs(y - ref).max() / np.abs(ref).max() < RTOL
