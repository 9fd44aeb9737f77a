"""HF attention traced as bitsmith::attention: Gemma 2 (logit soft-caps, query_pre_attn_scalar, alternating
sliding-window / global layers) against transformers fp32, on the reference executor and on host kernels whose
windowed layers keep their KV in rings; the engine batching several sequences over those rings."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.pipeline import CompileOptions, MemoryOptions, compile_model
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.engine import Engine, Request
from bitsmith.runtime.executor import KernelRunner
from bitsmith.tools.describe import describe, format_summary
from bitsmith.tools.run import open_session
from family_zoo import zoo_model

RTOL = 1e-4  # relative to transformers' largest logit (float32 summation order is all that differs)
PREFILL, STEPS = 13, 8  # 13 prompt tokens: more than 3 windows of 4, so the window is honoured
CONTEXT = 256  # 16 blocks of 16; a window of 4 + one 64-row chunk needs a ring of 6 blocks


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    model = zoo_model("gemma2", max_position_embeddings=CONTEXT)
    assert model.config.layer_types == ["sliding_attention", "full_attention"] and model.config.sliding_window == 4
    path = tmp_path_factory.mktemp("gemma2")
    model.save_pretrained(path / "hf")
    art = load_artifact(compile_model(path / "hf", path / "art", CompileOptions(
        memory=MemoryOptions(context=CONTEXT, concurrency=3, kv_dtype="float32"))))
    return model, art


def _transformers(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _greedy_transformers(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(_transformers(model, ids)[-1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("executor", ["reference", "compiled"])
def test_gemma2_matches_transformers(gemma2, executor):
    model, art = gemma2
    ids = [int(t) for t in np.random.default_rng(1).integers(3, model.config.vocab_size, size=PREFILL + STEPS)]
    ref = _transformers(model, ids)
    session = open_session(art, executor)
    rows = [np.asarray(session.prefill(ids[:PREFILL]))] + [np.asarray(session.decode(t))[None] for t in ids[PREFILL:]]
    ours = np.concatenate(rows)
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    assert err < RTOL, f"{executor}: max |ours - transformers| / max |transformers| = {err:.2e}"
    assert np.abs(ref).max() <= 5.0 + 1e-5  # the final-logit soft-cap (5) was applied

    session.reset()
    logits, greedy = np.asarray(session.prefill(ids[:PREFILL]))[-1], []
    for _ in range(STEPS):
        greedy.append(int(np.argmax(logits)))
        logits = np.asarray(session.decode(greedy[-1]))
    assert greedy == _greedy_transformers(model, ids[:PREFILL], STEPS)


def test_gemma2_attention_attrs_and_kernels(gemma2):
    _, art = gemma2
    kernels = {c[0] for s in art.manifest["kernels"]["schedules"].values() for c in s["calls"]}
    attention = sorted(k for k in kernels if k.startswith("paged_attention_r1_"))
    # layer 0: window 4 on a ring of 6 blocks, layer 1: global; both soft-capped at 3, scale 24^-0.5
    assert len(attention) == 2 and all("_c3p0" in k and "_s0p2041241452319315_" in k for k in attention)
    assert any("_w4_" in k and k.endswith("_ring6") for k in attention) and any("_full_" in k for k in attention)
    assert {"div_c5p0_n96", "tanh_n96", "mul_c5p0_n96"} <= kernels  # the final-logit soft-cap, compiled


def test_ring_kv_plan_and_inspect(gemma2):
    _, art = gemma2
    kv = art.manifest["kv_plan"]
    assert kv["layer_windows"] == [4, 0] and kv["ring_blocks"] == 6 and kv["ring_slots"] == 3
    token_bytes = 2 * 2 * 16 * 4  # k and v, 2 kv heads x 16 dims, float32
    ring_layer, global_layer = kv["layer_bytes"]
    assert ring_layer == 3 * 6 * 16 * token_bytes  # 3 sequences x (window 4 + a 64-row chunk, in blocks)
    assert global_layer == kv["num_blocks"] * 16 * token_bytes >= 3 * CONTEXT * token_bytes
    assert kv["bytes"] == ring_layer + global_layer
    text = format_summary(describe(art.directory)[0])
    assert "windowed layers" in text and "ring of 6 blocks" in text, text


def test_engine_batches_sequences_over_the_rings(gemma2):
    """Five prompts (longer than a ring holds), three ring slots: batched greedy output equals each alone, and
    every ring slot comes back."""
    model, art = gemma2
    runner = KernelRunner(art)
    prompts = [[int(t) for t in np.random.default_rng(i).integers(3, 96, size=n)] for i, n in
               enumerate((5, 70, 130, 9, 100))]

    def alone(prompt):
        engine = Engine(runner)
        seq = engine.add(Request(prompt, 6))
        engine.run_until_done()
        return seq.generated

    engine = Engine(runner)
    seqs = [engine.add(Request(p, 6)) for p in prompts]
    engine.run_until_done()
    assert [s.generated for s in seqs] == [alone(p) for p in prompts]
    assert sorted(engine.ring_free) == [0, 1, 2] and engine.pool.available() == engine.pool.num_blocks
    assert seqs[2].generated == _greedy_transformers(model, prompts[2], 6)


def test_device_runner_reads_the_rings_too(gemma2):
    """The device runner's path (here on tvm.cpu()) with ring tables gives the host runner's logits."""
    import tvm

    from bitsmith.runtime.cuda_runner import DeviceKernelRunner
    from bitsmith.runtime.session import CompiledSession

    _, art = gemma2
    ids = [int(t) for t in np.random.default_rng(2).integers(3, 96, size=90)]
    out = []
    for session in (CompiledSession(art), CompiledSession(art, runner=DeviceKernelRunner(art, tvm.cpu()))):
        out.append(np.concatenate([session.prefill(ids[:80])] + [session.decode(t)[None] for t in ids[80:]]))
    np.testing.assert_allclose(out[1], out[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, overrides", [
    ("mistral", {"sliding_window": 8}),  # every layer windowed: the rings are the whole cache
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8,
               "layer_types": ["full_attention", "sliding_attention"]}),  # layer 1 windowed (max_window_layers 1)
])
def test_windowed_families_on_rings_match_transformers(family, overrides, tmp_path):
    model = zoo_model(family, max_position_embeddings=CONTEXT, **overrides)
    model.save_pretrained(tmp_path / "hf")
    art = load_artifact(compile_model(tmp_path / "hf", tmp_path / "art", CompileOptions(
        memory=MemoryOptions(context=CONTEXT, concurrency=2, kv_dtype="float32"))))
    windows = art.manifest["kv_plan"]["layer_windows"]
    assert windows == ([8, 8] if family == "mistral" else [0, 8]) and art.manifest["kv_plan"]["ring_blocks"] == 6
    ids = [int(t) for t in np.random.default_rng(3).integers(3, model.config.vocab_size, size=30)]
    ref = _transformers(model, ids)
    session = open_session(art, "compiled")
    ours = np.concatenate([session.prefill(ids[:22])] + [session.decode(t)[None] for t in ids[22:]])
    assert np.abs(ours - ref).max() / np.abs(ref).max() < RTOL


@pytest.mark.parametrize("scale, window, softcap", [(0.25, 0, 0.0), (0.2, 3, 0.0), (0.5, 0, 2.0), (0.3, 4, 1.5)])
def test_custom_op_is_transformers_eager_attention(scale, window, softcap):
    """bitsmith::attention's eager body (what torch.export records, and what the IR op is) against transformers'
    own eager attention with its causal / sliding-window mask, on GQA shapes."""
    import torch
    from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

    from bitsmith.compiler.frontends.hf_attention import register

    register()
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 6, 9, 8), torch.randn(1, 2, 9, 8), torch.randn(1, 2, 9, 8)
    pos = torch.arange(9)
    visible = (pos[None, :] <= pos[:, None]) & ((pos[None, :] > pos[:, None] - window) if window else True)
    mask = torch.where(visible, 0.0, float("-inf"))[None, None]
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 3, False
    expect, _ = eager_attention_forward(module, q, k, v, mask, scaling=scale, softcap=softcap or None)
    got = torch.ops.bitsmith.attention(q, k, v, scale, window, softcap).transpose(1, 2)
    torch.testing.assert_close(got, expect, rtol=1e-6, atol=1e-6)


def test_attention_sinks_are_refused():
    import torch

    from bitsmith.compiler.frontends.hf_attention import _hf_attention
    from bitsmith.errors import BitsmithError

    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(BitsmithError, match="attention sinks"):
        _hf_attention(torch.nn.Module(), q, q, q, None, scaling=0.5, s_aux=torch.zeros(2))
