"""fold_weight_expressions: Gemma's `(1 + w)` norm scale becomes one float32 weight under w's own name, the norm
fuses with it, and the numbers do not move; an expression that reads activations is left alone."""

from __future__ import annotations

import numpy as np
import torch

from bitsmith.compiler.frontends.torch_export import trace_module
from bitsmith.passes.canonicalize import canonicalize
from family_zoo import zoo_model


def test_gemma_norm_offset_folds_into_the_norm_weight():
    model = zoo_model("gemma")
    module, weights = canonicalize(*trace_module(model, torch.arange(2, 10)))
    ops = [n.op for n in module["decode"].nodes]
    assert ops.count("rmsnorm") == 5 and "const" not in [n.op for n in module["decode"].nodes
                                                           if n.outputs[0].startswith("layers.0.input_layernorm")]
    hf = model.model.layers[0].input_layernorm.weight.detach().numpy()
    folded = weights["layers.0.input_layernorm.weight"]
    assert folded.dtype == np.float32 and np.array_equal(folded, hf + np.float32(1.0))
    norms = [n for n in module["decode"].nodes if n.op == "rmsnorm"]
    assert all(len(n.inputs) == 2 for n in norms)  # every norm reads its (folded) weight


def test_embedding_scale_stays_a_runtime_multiply():
    model = zoo_model("gemma")
    module, weights = canonicalize(*trace_module(model, torch.arange(2, 10)))
    muls = [n for n in module["decode"].nodes if n.op == "mul" and n.outputs[0].startswith("embed_tokens")]
    assert len(muls) == 1  # embedding * sqrt(hidden): reads an activation, so nothing is folded
    assert "embed_tokens.weight.folded" not in weights
