"""MoE families (Mixtral, Qwen3-MoE, OLMoE) trace to `router` + `moe` ops and match transformers (fp32, reference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bitsmith.compiler.ops.moe import route, topk_last
from family_zoo import MOE, zoo_model
from test_torch_export import EXAMPLE, assert_matches_transformers, op_counts, traced


@pytest.mark.parametrize("family", MOE)
def test_moe_family_matches_transformers(family):
    model = zoo_model(family)
    module, weights = traced(model, EXAMPLE)
    counts = op_counts(module, "decode")
    layers = model.config.num_hidden_layers
    assert counts["router"] == layers and counts["moe"] == layers
    assert not {"topk", "softmax", "sum", "div"} & set(counts)  # fused into the router
    e = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
    assert weights["layers.0.mlp.experts.gate_up_proj"].shape[0] == e  # one stacked tensor per projection
    assert_matches_transformers(model, module, weights)


@pytest.mark.parametrize("norm", [False, True])
def test_router_normalisation_follows_the_config(norm):
    model = zoo_model("qwen3_moe", norm_topk_prob=norm)
    module, weights = traced(model, EXAMPLE)
    router = next(n for n in module["prefill"].nodes if n.op == "router")
    assert router.attrs == {"top_k": 2, "scoring": "softmax", "normalize": norm}
    assert_matches_transformers(model, module, weights)


def test_the_experts_implementation_is_restored():
    model = zoo_model("mixtral")
    before = model.get_experts_implementation()
    traced(model, EXAMPLE)
    assert model.get_experts_implementation() == before


def test_router_reference_matches_torch():
    logits = np.random.default_rng(0).standard_normal((7, 8)).astype(np.float32)
    logits[0, 3] = logits[0, 5]  # a tie: the lower index first, as torch.topk
    p = torch.softmax(torch.tensor(logits), -1)
    values, idx = torch.topk(p, 2, dim=-1)
    w, e = route(logits, 2, "softmax", True)
    np.testing.assert_array_equal(e, idx.numpy())
    np.testing.assert_allclose(w, (values / values.sum(-1, keepdim=True)).numpy(), rtol=1e-6)
    v, i = topk_last(logits, 3)
    np.testing.assert_array_equal(i, torch.topk(torch.tensor(logits), 3, dim=-1).indices.numpy())


def test_an_in_place_write_through_a_view_is_refused():
    """`x /= s` on a fresh tensor (the routers) becomes a value; through a view the IR would silently read the
    base as it was before the write, so the trace stops and names the line."""
    from bitsmith.compiler.frontends.torch_export import trace_module
    from bitsmith.errors import BitsmithError

    class ScaledHead(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = torch.nn.Embedding(32, 16), torch.nn.Linear(16, 32, bias=False)

        def forward(self, input_ids):
            h = self.emb(input_ids) * 1.0
            h[..., :4].mul_(2.0)
            return self.head(h)

    with pytest.raises(BitsmithError, match="in-place aten.mul_ on a view") as err:
        trace_module(ScaledHead(), EXAMPLE)
    assert "h[..., :4].mul_(2.0)" in err.value.where
