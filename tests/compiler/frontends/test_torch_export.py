"""torch.export frontend: traced models match transformers (prefill + 8 decode steps) and the hand-written IR."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
import transformers

from bitsmith.compiler.analysis import dead_code_elimination
from bitsmith.compiler.config import expected_weight_shapes
from bitsmith.compiler.frontends.base import LoadedModel
from bitsmith.compiler.frontends.hf import config_from_hf, load_hf
from bitsmith.compiler.frontends.llama import build_llama_module
from bitsmith.compiler.frontends.torch_export import trace_module
from bitsmith.compiler.builder import FunctionBuilder
from bitsmith.compiler.ir import Module, TensorType
from bitsmith.compiler.reference import ReferenceSession, run_function
from bitsmith.compiler.verify import verify_module
from bitsmith.errors import BitsmithError
from bitsmith.passes.canonicalize import canonical_model, canonicalize
from bitsmith.passes.fuse_rmsnorm import fuse_rmsnorm
from bitsmith.passes.fuse_silu import fuse_silu
from bitsmith.passes.simplify_layout import simplify_layout
from conftest import FAMILIES, make_tiny_hf_model

RTOL = 1e-4
EXAMPLE = torch.arange(2, 10)


def traced(model, example_ids):
    """trace_module, then the pipeline's canonicalize phase (fusions, decode, only the weights read)."""
    return canonicalize(*trace_module(model, example_ids))


def teacher_forced(module, weights, ids: np.ndarray, n_prefill: int = 5) -> np.ndarray:
    """Logits of prefill(ids[:n]) followed by one decode step per remaining token."""
    session = ReferenceSession(module, weights, 32)
    rows = [session.prefill([int(t) for t in ids[:n_prefill]])]
    rows += [session.decode(int(t))[None] for t in ids[n_prefill:]]
    return np.concatenate(rows)


def assert_matches_transformers(model, module, weights) -> None:
    ids = np.random.default_rng(1).integers(3, model.config.vocab_size, size=13)  # prefill 5, decode 8
    with torch.no_grad():
        ref = model(torch.tensor(ids[None])).logits[0].numpy()
    ours = teacher_forced(module, weights, ids)
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) < RTOL


def op_counts(module, entry: str = "prefill") -> Counter:
    return Counter(node.op for node in module[entry].nodes)


def randomize_vectors(model) -> None:
    """Norm weights and biases start as ones/zeros; perturb them so a wrong mapping cannot hide."""
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if name.endswith("weight") else 0.0))


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=128)
    if arch == "gpt_neox":  # layernorm, exact gelu, fused qkv, partial rotary, parallel residual
        return transformers.GPTNeoXConfig(**common, rotary_pct=0.5, hidden_act="gelu", **overrides)
    if arch == "phi":  # layernorm, tanh gelu spelled out in ops, biases, partial rotary
        return transformers.PhiConfig(**common, partial_rotary_factor=0.5, **overrides)
    if arch == "mistral":
        return transformers.MistralConfig(**common, num_key_value_heads=2, **overrides)
    raise ValueError(arch)


def tiny_model(arch: str, **overrides):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config(arch, **overrides), dtype=torch.float32).eval()
    randomize_vectors(model)
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_traced_family_matches_transformers_and_hand_written_ops(family):
    model = make_tiny_hf_model(family)
    randomize_vectors(model)
    module, weights = traced(model, EXAMPLE)
    verify_module(module)
    assert model.config._attn_implementation == "eager"  # restored after tracing with sdpa
    assert_matches_transformers(model, module, weights)
    config = config_from_hf(model.config.to_dict())
    built = build_llama_module(config, {})
    for entry in ("prefill", "decode"):
        assert op_counts(module, entry) == op_counts(built, entry)
    assert set(weights) == set(expected_weight_shapes(config))  # canonical names, inv_freq folded into rope
    assert module["decode"].inputs[0][1].shape == (1,)
    assert module["prefill"].inputs[2][1].shape == (2, 2, "ctx", 2, 16)


@pytest.mark.parametrize("arch", ["gpt_neox", "phi"])
def test_architecture_without_hand_written_mapping(arch):
    model = tiny_model(arch)
    module, weights = traced(model, EXAMPLE)
    verify_module(module)
    assert_matches_transformers(model, module, weights)
    counts = op_counts(module)
    assert counts["layernorm"] == {"gpt_neox": 5, "phi": 3}[arch]  # phi: one norm per parallel block
    assert counts["gelu"] == 2 and counts["rope"] == 4 and counts["attention"] == 2
    assert "rmsnorm" not in counts and "tanh" not in counts and "transpose" not in counts
    ropes = [n for n in module["prefill"].nodes if n.op == "rope"]
    assert all(n.attrs["rotary_dim"] == 8 and n.attrs["theta"] == 10000.0 for n in ropes)  # partial: 8 of 16
    gelus = [n.attrs.get("approximate", "none") for n in module["prefill"].nodes if n.op == "gelu"]
    assert gelus == (["tanh"] * 2 if arch == "phi" else ["none"] * 2)


def test_sliding_window_comes_from_the_attention_module():
    model = tiny_model("mistral", sliding_window=4)  # 13 tokens: the window matters for prefill and decode
    module, weights = traced(model, EXAMPLE)
    assert {n.attrs["sliding_window"] for n in module["decode"].nodes if n.op == "attention"} == {4}
    assert_matches_transformers(model, module, weights)


def _tokenizer_json(path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


def test_load_hf_routes_unknown_architecture_through_export(tmp_path):
    model = tiny_model("gpt_neox", bos_token_id=1, eos_token_id=2)
    model.save_pretrained(tmp_path)
    _tokenizer_json(tmp_path / "tokenizer.json")
    loaded = canonical_model(load_hf(tmp_path))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source["format"] == "hf-torch-export" and loaded.config["model_type"] == "gpt_neox"
    assert loaded.module.meta["frontend"] == "torch_export" and loaded.module.meta["num_layers"] == 2
    assert loaded.tokenizer.kind == "hf" and loaded.tokenizer.eos_token_ids == (2,)
    assert "gpt_neox.layers.0.attention.query_key_value.weight" in loaded.weights
    verify_module(loaded.module)
    assert_matches_transformers(model, loaded.module, loaded.weights)


class _Toy(torch.nn.Module):
    """No attention: the KV cache has zero layers, and `cumprod` has no IR lowering."""

    def __init__(self, unsupported: bool):
        super().__init__()
        self.embed, self.head, self.unsupported = torch.nn.Embedding(16, 8), torch.nn.Linear(8, 16), unsupported

    def forward(self, input_ids):
        x = self.embed(input_ids)
        if self.unsupported:
            x = torch.cumprod(x, dim=-1)
        return self.head(torch.nn.functional.silu(x))


def test_plain_module_without_attention():
    torch.manual_seed(0)
    toy = _Toy(unsupported=False)
    module, weights = traced(toy, EXAMPLE % 16)
    verify_module(module)
    assert set(weights) == {"embed.weight", "head.weight", "head.bias"}
    ids = np.arange(9) % 16
    with torch.no_grad():
        ref = toy(torch.tensor(ids[None])).numpy()[0]
    np.testing.assert_allclose(teacher_forced(module, weights, ids), ref, rtol=1e-5, atol=1e-6)


def test_unsupported_op_names_the_op_and_the_source_line():
    with pytest.raises(BitsmithError) as info:
        trace_module(_Toy(unsupported=True), EXAMPLE % 16)
    message = str(info.value)
    assert "cumprod" in message and "test_torch_export.py" in message and "torch.cumprod" in message


def test_fusion_passes_keep_the_numbers_and_leave_their_input_alone():
    weights = {"w": TensorType((8,), "float32")}
    b = FunctionBuilder("prefill", weights)
    x = b.input("x", TensorType(("seq", 8), "float32"))
    mean = b.op("mean", [b.op("pow", [x], exponent=2.0)], axes=[-1], keepdim=True)
    inv = b.op("rsqrt", [b.op("add", [mean, b.op("const", [], value=1e-5, dtype="float32")])])
    y = b.op("mul", [b.weight("w"), b.op("mul", [x, inv])])  # w * (x * rsqrt(mean(x^2) + eps))
    y = b.op("transpose", [b.op("transpose", [y], perm=[1, 0])], perm=[1, 0])
    module = Module({"prefill": b.finish([b.op("mul", [y, b.op("sigmoid", [y])])])}, weights)
    before = module.to_json()
    fused = simplify_layout(fuse_silu(fuse_rmsnorm(module)))
    assert module.to_json() == before
    assert [n.op for n in dead_code_elimination(fused["prefill"]).nodes] == ["weight", "rmsnorm", "silu"]
    args = ({"w": np.linspace(0.5, 1.5, 8, dtype=np.float32)}, {"x": np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)})
    np.testing.assert_allclose(run_function(fused["prefill"], *args)[0], run_function(module["prefill"], *args)[0],
                               rtol=1e-5)


def test_gpt2_conv1d_becomes_linear_on_transposed_weights():
    from family_zoo import zoo_model

    model = zoo_model("gpt2")
    module, weights = traced(model, EXAMPLE)
    verify_module(module)
    assert_matches_transformers(model, module, weights)
    counts = op_counts(module)
    assert counts["linear"] == 2 * 4 + 1 and "matmul" not in counts  # c_attn, c_proj, c_fc, mlp c_proj; lm_head
    conv = model.transformer.h[0].attn.c_attn.weight.detach().numpy()  # Conv1D: [in, out]
    assert np.array_equal(weights["transformer.h.0.attn.c_attn.weight"], conv.T)  # stored as linear's [out, in]
    assert counts["embedding"] == 2  # tokens and learned absolute positions
