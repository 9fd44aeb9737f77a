"""untie_lm_head: a tied lm_head gets its own weight, which --scheme can then quantize; the lookup stays exact."""

from __future__ import annotations

import json

import numpy as np

from bitsmith.pipeline import CompileOptions, MemoryOptions, QuantOptions, compile_model
from bitsmith.passes.base import PassContext
from bitsmith.passes.untie_lm_head import LM_HEAD, UntieLmHead, tied_weights
from bitsmith.runtime.artifact import load_artifact
from bitsmith.tools.run import open_session
from conftest import RANDOM_CONFIGS, random_model, save_tiny_hf_model


def test_untie_gives_the_linear_its_own_weight_and_keeps_the_lookup():
    module, weights = random_model(RANDOM_CONFIGS["qwen3-interleaved"])  # tied embeddings
    (tied,) = tied_weights(module)
    ctx = PassContext(dict(weights))
    out = UntieLmHead().run(module, ctx)
    assert tied_weights(out) == set() and LM_HEAD in out.weights and ctx.weights[LM_HEAD] is weights[tied]
    for fn in out.functions.values():
        name_of = {n.outputs[0]: n.attrs["name"] for n in fn.nodes if n.op == "weight"}
        assert {name_of[n.inputs[0]] for n in fn.nodes if n.op == "embedding"} == {tied}
        assert LM_HEAD in {name_of[n.inputs[1]] for n in fn.nodes if n.op == "linear"}
    assert UntieLmHead().run(out, ctx) is out  # nothing tied any more: unchanged
    untied, _ = random_model(RANDOM_CONFIGS["gqa"])
    assert UntieLmHead().run(untied, PassContext({})) is untied


def test_scheme_on_a_tied_lm_head_quantizes_it_and_greedy_matches_the_reference(tmp_path):
    save_tiny_hf_model(tmp_path / "model", "llama", tie=True)
    opts = CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, schemes=(("lm_head", "int8"),)),
                          memory=MemoryOptions(context=64))
    art = load_artifact(compile_model(tmp_path / "model", tmp_path / "art", opts))
    plan = art.manifest["ir"]["meta"]["precision_plan"]
    assert plan[LM_HEAD]["bits"] == 8 and "model.embed_tokens.weight" not in plan and "embed_tokens.weight" not in plan
    assert any(n.endswith("embed_tokens.weight") and w.dtype == np.float16 for n, w in art.weights.items())
    prompt = [5, 9, 13, 2, 7]
    outs = []
    for executor in ("compiled", "reference"):
        session = open_session(art, executor)
        logits = session.prefill(prompt)[-1]
        tokens = []
        for _ in range(8):
            tokens.append(int(np.argmax(logits)))
            logits = session.decode(tokens[-1])
        outs.append(tokens)
    assert outs[0] == outs[1], json.dumps(outs)
    # without the override nothing is untied: the tied table is stored once
    plain = load_artifact(compile_model(tmp_path / "model", tmp_path / "plain", CompileOptions(
        quant=QuantOptions("rtn", bits=4, group_size=32), memory=MemoryOptions(context=64))))
    assert not any(n.startswith("lm_head") for n in plain.weights)
