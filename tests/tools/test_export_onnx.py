"""ONNX export (MatMulNBits decoder with a KV cache) checked by onnxruntime itself against our reference executor."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams
from bitsmith.tools.export import ExportOptions, export
from bitsmith.tools.onnx_nbits import NotMappable, dequantize_nbits, to_nbits
from bitsmith.tools.onnx_session import OnnxSession
from bitsmith.tools.run import reference_session
from gptq_checkpoint import write_act_order_gptq

GREEDY = SamplingParams(temperature=0.0)
# onnxruntime's float32 MatMul/Softmax sum in another order than numpy: logits agree to ~1e-6 of their scale
LOGIT_RTOL = 1e-4
# one of each MatMulNBits mapping: 4-bit sym g32 (the default), 8-bit asym and sym g32, 4-bit asym g64, 3-bit
# per-channel widened to 4 (block 64), 2-bit asym, 4-bit per-channel over K = 112 (one block of 128)
MIXED = (("self_attn.k_proj", "int8-g32-asym"), ("self_attn.v_proj", "int4-g64-asym"), ("self_attn.o_proj", "int3-pc"), ("mlp.gate_proj", "int8-g32"),
         ("mlp.up_proj", "int2-g32-asym"), ("mlp.down_proj", "int4-pc"))


def _options(schemes=(), kv_dtype="float16") -> CompileOptions:
    quant = QuantOptions("rtn", bits=4, group_size=32, keep_default=False, schemes=schemes)
    return CompileOptions(quant=quant, memory=MemoryOptions(context=128, kv_dtype=kv_dtype),
                          target=TargetOptions("none"))


def _export(artifact, out, **kw):
    return export(artifact, out, ExportOptions("onnx", **kw))


def _greedy(session, prompt, n):
    return list(generate(session, prompt, n, GREEDY, stop_ids=()))


def _assert_logits(ref, got):
    scale = float(np.abs(ref).max())
    assert float(np.abs(ref - got).max()) <= LOGIT_RTOL * scale, (float(np.abs(ref - got).max()), scale)


@pytest.mark.parametrize("level", [0, 4])
@pytest.mark.parametrize("bits,group,form", [(4, 32, "sym"), (4, 64, "asym"), (4, 32, "min"), (8, 32, "sym"),
                                             (8, 32, "asym"), (3, 16, "sym"), (3, 32, "asym"), (2, 16, "min"),
                                             (5, 32, "min"), (6, 16, "sym"), (4, -1, "sym"), (2, -1, "asym")])
def test_matmulnbits_operands_dequantize_to_ours(bits, group, form, level):
    """The MatMulNBits parts plus the offset term dequantize to our weight (bit for bit for sym single parts; else
    within the float rounding they report), and onnxruntime's sum of the parts matches them."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(bits * 100 + group)
    n, k = 24, 96 if group != -1 else 72
    g = k if group == -1 else group
    ng = -(-k // g)
    codes = rng.integers(0, 1 << bits, (n, k)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.1, (n, ng)).astype(np.float16).astype(np.float32)
    zeros = rng.uniform(0, (1 << bits) - 1, (n, ng)).astype(np.float16) if form == "asym" else None
    offsets = rng.uniform(-0.5, 0, (n, ng)).astype(np.float32) if form == "min" else None
    cols = np.arange(k) // g
    if form == "min":
        ours = scales[:, cols] * codes + offsets[:, cols]
    else:
        z = np.float32(1 << (bits - 1)) if zeros is None else zeros.astype(np.float32)[:, cols]
        ours = (codes - z) * scales[:, cols]
    nb = to_nbits(codes, bits, group, scales, zeros, offsets, accuracy_level=level)
    theirs = dequantize_nbits(nb)
    assert np.abs(ours - theirs).max() == nb.max_abs_error <= 2e-7 * np.abs(ours).max()
    if form == "sym" and len(nb.parts) == 1:
        assert nb.max_abs_error == 0.0 and nb.offsets is None
    want_bits = {0: {2: "4", 3: "4", 4: "4", 5: "4+4", 6: "4+4", 8: "4+4"},
                 4: {2: "2", 3: "4", 4: "4", 5: "8", 6: "8", 8: "8"}}[level][bits]
    assert nb.target.startswith(f"MatMulNBits {want_bits}-bit"), nb.target
    nodes, inits = [], []
    for i, part in enumerate(nb.parts):
        inits += [numpy_helper.from_array(part.blob, f"B{i}"), numpy_helper.from_array(part.scales, f"S{i}")]
        nodes.append(helper.make_node("MatMulNBits", ["A", f"B{i}", f"S{i}"], [f"Y{i}"], domain="com.microsoft", K=k,
                                      N=n, bits=part.bits, block_size=nb.block_size))
    nodes.append(helper.make_node("Sum", [f"Y{i}" for i in range(len(nb.parts))], ["Y"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    x = rng.standard_normal((3, k)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": x})[0]
    if nb.offsets is not None:
        y = y + np.add.reduceat(x, np.arange(0, k, g), axis=1) @ nb.offsets.T
    want = x @ ours.T
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-6 * np.abs(want).max())  # float sums in another order


def test_codes_with_no_matmulnbits_width_are_refused():
    with pytest.raises(NotMappable, match="7-bit") as info:
        to_nbits(np.zeros((4, 32), np.uint8), 7, 32, np.ones((4, 1), np.float32), where="w")
    assert "int4" in info.value.nearest and "--allow-requantize" in str(info.value)


def test_tiny_llama_mixed_schemes_greedy_and_logits(tiny_artifact, tmp_path):
    """A tiny random Llama with one weight of each mapping: onnxruntime's prefill logits match the reference
    executor's, and a 32-token greedy decode (KV cache fed back) gives the same tokens."""
    path = tiny_artifact(_options(MIXED))
    report = _export(path, tmp_path / "onnx")
    targets = {t.target for t in report.tensors}
    # accuracy level 0: 8-bit as two 4-bit parts (+ 8 s per group, or the asym offsets), 2-bit widened to 4
    assert targets == {"float16", "MatMulNBits 4-bit b32", "MatMulNBits 4+4-bit b32 +offsets", "MatMulNBits 4-bit b64",
                       "MatMulNBits 4-bit b64 +offsets", "MatMulNBits 4-bit b32 +offsets", "MatMulNBits 4-bit b128"}, targets
    assert all(t.exact for t in report.tensors)
    artifact = load_artifact(path)
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    ref, ort_session = reference_session(artifact), OnnxSession(tmp_path / "onnx")
    _assert_logits(ref.prefill(prompt), ort_session.prefill(prompt))
    for token in (7, 80, 3):
        _assert_logits(ref.decode(token), ort_session.decode(token))
    ref.reset(), ort_session.reset()
    assert _greedy(ort_session, prompt, 32) == _greedy(ref, prompt, 32)
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    assert {i.name for i in model.graph.input} >= {"input_ids", "attention_mask", "position_ids",
                                                   "past_key_values.1.value"}
    assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16  # the artifact's fp16 KV


def test_batch_of_two_matches_one_and_left_padding_is_masked(tiny_artifact, tmp_path):
    """Two rows in one batch: the same prompt gives the same logits as alone; a left-padded shorter prompt (mask 0,
    positions from 0 at its first real token) gives the logits of that prompt alone."""
    path = tiny_artifact(_options())
    _export(path, tmp_path / "onnx")
    long, short = [1, 5, 17, 33, 9, 60], [1, 40, 22, 8]
    alone = OnnxSession(tmp_path / "onnx")
    want_long = alone.prefill(long)
    alone.reset()
    want_short = alone.prefill(short)
    both = OnnxSession(tmp_path / "onnx", batch=2)
    pad = len(long) - len(short)
    ids = np.array([long, [0] * pad + short])
    mask = np.array([[1] * len(long), [0] * pad + [1] * len(short)])
    positions = np.array([list(range(len(long))), [0] * pad + list(range(len(short)))])
    got = both.run(ids, mask, positions)
    np.testing.assert_allclose(got[0], want_long, rtol=0, atol=1e-4 * np.abs(want_long).max())
    np.testing.assert_allclose(got[1, pad:], want_short, rtol=0, atol=1e-4 * np.abs(want_short).max())


def test_allow_requantize_stores_an_unmappable_weight_dequantized(tiny_artifact, tmp_path, monkeypatch):
    """Every scheme of ours maps today; the --allow-requantize path (a float MatMul of our dequantized weight) is
    driven by making down_proj unmappable: refused without the flag (nothing written), reported with it."""
    from bitsmith.tools import export_onnx

    real = export_onnx.to_nbits

    def refuse_down(*args, where="", **kw):
        if "down_proj" in where:
            raise NotMappable("test: no form", nearest="int4", where=where)
        return real(*args, where=where, **kw)

    monkeypatch.setattr(export_onnx, "to_nbits", refuse_down)
    path = tiny_artifact(_options((("mlp.down_proj", "int4-g32-asym"),)))
    with pytest.raises(BitsmithError, match="down_proj.*no form"):
        _export(path, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    report = _export(path, tmp_path / "onnx", allow_requantize=True)
    converted = {t.name: t for t in report.requantized}
    assert set(converted) == {f"layers.{i}.mlp.down_proj.weight" for i in range(2)}
    assert all(t.target == "float32 MatMul" for t in converted.values())
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    _assert_logits(reference_session(load_artifact(path)).prefill(prompt), OnnxSession(tmp_path / "onnx").prefill(prompt))


def test_accuracy_level_4_int8_activations(tiny_artifact, tmp_path):
    """accuracy_level=4 (int8 activations per block) is written into every MatMulNBits and stays close: top-1 of
    the teacher-forced logits agrees with the float graph on most positions; 8- and 2-bit weights stay native."""
    path = tiny_artifact(_options(MIXED))
    report = export(path, tmp_path / "onnx4", ExportOptions("onnx", accuracy_level=4))
    assert "accuracy_level=4" in report.notes[-1]
    assert {"MatMulNBits 8-bit b32", "MatMulNBits 8-bit b32 +offsets", "MatMulNBits 2-bit b32 +offsets"} <= {
        t.target for t in report.tensors}
    model = onnx.load(str(tmp_path / "onnx4" / "model.onnx"))
    levels = {a.i for n in model.graph.node if n.op_type == "MatMulNBits" for a in n.attribute
              if a.name == "accuracy_level"}
    assert levels == {4}
    _export(path, tmp_path / "onnx0")
    tokens = list(np.random.default_rng(1).integers(3, 96, 64))
    exact = OnnxSession(tmp_path / "onnx0").prefill(tokens)
    int8 = OnnxSession(tmp_path / "onnx4").prefill(tokens)
    agree = float(np.mean(exact.argmax(-1) == int8.argmax(-1)))
    assert agree >= 0.9, agree
    assert np.abs(exact - int8).max() < 0.05 * np.abs(exact).max()


def test_cli_export_onnx_accuracy_level(tiny_artifact, tmp_path):
    from click.testing import CliRunner

    from bitsmith.cli import main

    path = tiny_artifact(_options())
    result = CliRunner().invoke(main, ["export", str(path), "--format", "onnx", "-o", str(tmp_path / "o"),
                                       "--accuracy-level", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert "accuracy_level=4" in " ".join(report["notes"])
    config = json.loads((tmp_path / "o" / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_key_value_heads"] == 2
    bad = CliRunner().invoke(main, ["export", str(path), "--format", "gptq", "-o", str(tmp_path / "g"),
                                    "--accuracy-level", "4"])
    assert bad.exit_code != 0 and "onnx only" in bad.output


def test_onnxruntime_genai_runs_the_export(tiny_artifact, tmp_path):
    """onnxruntime-genai (when installed: not a CI dependency) loads OUT with our genai_config.json and its greedy
    search gives our tokens."""
    og = pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    path = tiny_artifact(_options())
    _export(path, tmp_path / "onnx")
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    model = og.Model(str(tmp_path / "onnx"))
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + 32)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    got = []
    while not generator.is_done() and len(got) < 32:
        generator.generate_next_token()
        got.append(int(generator.get_next_tokens()[0]))
    want = _greedy(reference_session(load_artifact(path)), prompt, 32)
    assert got == want[:len(got)] and len(got) >= 16  # genai stops early only at EOS (id 2)


def test_tinystories_int4_g32_greedy_as_ours(shared_data, tmp_path):
    """tinystories-656k int4 g32: 40 greedy tokens under onnxruntime equal the reference executor's; prefill logits
    within LOGIT_RTOL of their scale; accuracy_level=4 agrees on most tokens."""
    from bitsmith.pipeline import compile_model

    path = compile_model(shared_data / "tinystories-656k", tmp_path / "ts", _options(kv_dtype="auto"))
    _export(path, tmp_path / "onnx")
    artifact = load_artifact(path)
    prompt = artifact.tokenizer().encode("Once upon a time, there was a little girl named")
    ref, got = reference_session(artifact), OnnxSession(tmp_path / "onnx")
    _assert_logits(ref.prefill(prompt), got.prefill(prompt))
    ref.reset(), got.reset()
    want = _greedy(ref, prompt, 40)
    assert _greedy(got, prompt, 40) == want
    export(path, tmp_path / "onnx4", ExportOptions("onnx", accuracy_level=4))
    int8 = _greedy(OnnxSession(tmp_path / "onnx4"), prompt, 40)
    assert np.mean(np.array(int8) == np.array(want)) >= 0.5


def _logits_match_reference(artifact, out, prompt=(1, 5, 17, 33, 9, 60, 2, 41)):
    ref = reference_session(load_artifact(artifact))
    _assert_logits(ref.prefill(list(prompt)), OnnxSession(out).prefill(list(prompt)))


def test_act_order_gptq_import_exports_a_gather_before_matmulnbits(tiny_llama_dir, tmp_path):
    """A GPTQ v1 act-order checkpoint (random codes, random column orders, asym: the offset term too) imported with
    its `perm`: the export gathers x by perm before each MatMulNBits and matches the reference executor."""
    from bitsmith.pipeline import compile_model

    src = tmp_path / "src"
    write_act_order_gptq(tiny_llama_dir, src, sym=False)
    art = compile_model(src, tmp_path / "art", CompileOptions(memory=MemoryOptions(context=64),
                                                              target=TargetOptions("none")))
    report = _export(art, tmp_path / "onnx")
    assert {t.target for t in report.tensors if t.name.endswith("_proj.weight")} == {"MatMulNBits 4-bit b16 +offsets"}
    model = onnx.load(str(tmp_path / "onnx" / "model.onnx"))
    gathers = [n for n in model.graph.node if n.op_type == "Gather" and any(a.name == "axis" and a.i == -1
                                                                           for a in n.attribute)]
    assert len(gathers) == 14  # one per quantized linear of the 2 layers
    _logits_match_reference(art, tmp_path / "onnx")


def test_q4_k_m_gguf_import_exports_exactly(shared_data, tmp_path):
    """A Q4_K_M file made by llama.cpp (tiny random Llama, rows of 256; Q4_K: min form with int8 codes of scales
    and mins per super-block, Q6_K: 6-bit sym) imported exactly and exported: every weight maps, logits match the
    reference executor and 32 greedy tokens agree."""
    import sys
    from pathlib import Path

    from bitsmith.pipeline import compile_model

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compiler" / "frontends"))
    import llamacpp_gguf

    llamacpp_gguf.make_family(tmp_path, "llama", shared_data)
    art = compile_model(tmp_path / "Q4_K_M.gguf", tmp_path / "art",
                        CompileOptions(memory=MemoryOptions(context=128), target=TargetOptions("none")))
    report = _export(art, tmp_path / "onnx")
    assert all(t.exact for t in report.tensors)
    assert any("+offsets" in t.target for t in report.tensors)  # Q4_K's mins
    _logits_match_reference(art, tmp_path / "onnx")
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    want = _greedy(reference_session(load_artifact(art)), prompt, 32)
    assert _greedy(OnnxSession(tmp_path / "onnx"), prompt, 32) == want


@pytest.mark.parametrize("family", ["qwen3", "gemma2", "phi", "gpt2", "olmo2"])
def test_traced_families_export(family, tmp_path):
    """The export walks the artifact's IR, so traced families come along: q/k norms (qwen3, olmo2), soft-capping and
    sliding windows (gemma2), partial rotary and parallel blocks (phi), layernorm, learned positions, slices of a
    fused qkv (gpt2); int4 g16 everywhere: prefill and decode logits within 1e-4 of the reference's scale. MoE
    routing is refused by op name."""
    from family_zoo import zoo_model

    from bitsmith.pipeline import compile_model

    zoo_model(family).save_pretrained(tmp_path / "hf")
    quant = QuantOptions("rtn", bits=4, group_size=16, keep_default=False)
    art = compile_model(tmp_path / "hf", tmp_path / "art", CompileOptions(quant=quant, memory=MemoryOptions(context=64),
                                                                          target=TargetOptions("none")))
    _export(art, tmp_path / "onnx")
    ref, got = reference_session(load_artifact(art)), OnnxSession(tmp_path / "onnx")
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    _assert_logits(ref.prefill(prompt), got.prefill(prompt))
    _assert_logits(ref.decode(7), got.decode(7))


def test_int4_kv_is_emulated_as_the_reference_rounds_it(tiny_artifact, tmp_path):
    """An int4-KV artifact: the export stores float32 KV rounded per token as kv_storage_round's int4 (step and
    minimum per head), so onnxruntime's logits follow the reference executor's through decode steps."""
    path = tiny_artifact(_options(kv_dtype="int4"))
    report = _export(path, tmp_path / "onnx")
    assert any("int4 min + code * step" in note for note in report.notes)
    ref, ort_session = reference_session(load_artifact(path)), OnnxSession(tmp_path / "onnx")
    prompt = [1, 5, 17, 33, 9, 60, 2, 41]
    _assert_logits(ref.prefill(prompt), ort_session.prefill(prompt))
    for token in (7, 80, 3):
        _assert_logits(ref.decode(token), ort_session.decode(token))
