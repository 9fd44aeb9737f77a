"""Lossless GGUF import: tensors of the ten exactly-mapped ggml types keep their codes (QuantizedWeight, method
"imported") through the frontend and the compiled artifact; the others come in as float with a note naming the
nearest exact type. Against the other engine: llama.cpp's perplexity and greedy tokens on the same files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest

import llamacpp_gguf as peer
from bitsmith.compiler.frontends.gguf import load_gguf
from bitsmith.compiler.gguf_blocks import GGUF_SCHEMES, encode
from bitsmith.runtime.quant_scheme import QuantizedWeight, dequantize
from test_gguf import hf_weights, tokens_and_merges, write_gguf

SMOLLM2_Q4_1 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj")  # in = 32 (down_proj: 48)


def retype(src: Path, dst: Path, kind: str, rng: np.random.Generator | None = None) -> None:
    """`src` with every matrix whose rows fit `kind`'s blocks stored as `kind`: quantized by gguf-py where it can
    (Q4_0 ... Q8_0), else random valid blocks (the K-quants; IQ4_NL), since only the bytes matter for the import."""
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    qtype = gguf.GGMLQuantizationType[kind]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    for t in reader.tensors:
        x = np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])
        if x.ndim != 2 or x.shape[1] % block:
            writer.add_tensor(t.name, x)
            continue
        if kind in GGUF_SCHEMES and kind.endswith("_K"):
            raw = random_blocks(kind, x.shape[0], x.shape[1], rng)
        elif kind in GGUF_SCHEMES:
            raw = gguf.quants.quantize(x, qtype)
        else:  # a type without an exact scheme: random bytes with a finite, small scale per block
            raw = rng.integers(0, 256, size=(x.shape[0], x.shape[1] // block, size), dtype=np.uint8)
            raw[..., :2] = np.full(raw.shape[:2] + (1,), 0.01, np.float16).view(np.uint8)
            raw = raw.reshape(x.shape[0], -1)
        writer.add_tensor(t.name, raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def random_blocks(kind: str, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """GGUF bytes of a random K-quant weight with weights of order 0.05 (fields drawn in their ranges)."""
    scheme = GGUF_SCHEMES[kind]
    groups, supers = cols // scheme.group_size, cols // 256
    lo, hi = {"Q2_K": (0, 16), "Q3_K": (-32, 32), "Q4_K": (0, 64), "Q5_K": (0, 64), "Q6_K": (-128, 128)}[kind]
    span = max(abs(lo), hi) * (1 << scheme.bits)
    q = rng.integers(0, 1 << scheme.bits, size=(rows, cols), dtype=np.uint8)
    scales = rng.integers(lo, hi, size=(rows, groups)).astype(np.int8)
    d = (rng.uniform(0.5, 1.0, size=(rows, supers)) * 0.1 / span).astype(np.float16)
    zeros = dmin = None
    if scheme.offset:
        zeros = rng.integers(0, hi, size=(rows, groups)).astype(np.int8)
        dmin = (-d * (1 << scheme.bits) / 2).astype(np.float16)
    return encode(QuantizedWeight(q, scales, zeros, scheme, cols, d, dmin))


def tiny_wide_gguf(path: Path, seed: int) -> Path:
    """A one-layer llama GGUF 256 wide (hidden = ff = 256: every matrix fits K-quant super-blocks), tied, F32."""
    import test_gguf

    saved = {k: getattr(test_gguf, k) for k in ("HIDDEN", "FF", "LAYERS", "HEAD_DIM")}
    try:
        test_gguf.HIDDEN, test_gguf.FF, test_gguf.LAYERS, test_gguf.HEAD_DIM = 256, 256, 1, 64
        write_gguf(path, test_gguf.hf_weights(True, seed=seed))
    finally:
        for k, v in saved.items():
            setattr(test_gguf, k, v)
    return path


def assert_exact(model) -> None:
    """Every imported weight dequantizes to the float32 the frontend also keeps, bit for bit."""
    for name, qw in model.quantized.items():
        dense = model.weights.get(name, model.weights["embed_tokens.weight"])  # a tied lm_head: the embedding
        assert np.array_equal(dequantize(qw).view(np.uint32), dense.view(np.uint32)), name


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
@pytest.mark.parametrize("tie", [True, False])
def test_legacy_types_import_exactly(tmp_path, kind, tie):
    write_gguf(tmp_path / "f32.gguf", hf_weights(tie, seed=11))
    retype(tmp_path / "f32.gguf", tmp_path / "q.gguf", kind)
    ckpt = load_gguf(tmp_path / "q.gguf")
    expected = {f"layers.{i}.{'mlp' if p in ('gate_proj', 'up_proj') else 'self_attn'}.{p}.weight"
                for i in range(2) for p in PROJECTIONS} | {"lm_head.weight"}
    assert set(ckpt.quantized) == expected  # down_proj (48 columns) stays F32; the embedding stays float
    assert set(ckpt.quantized_types.values()) == {kind}
    assert all(qw.scheme == GGUF_SCHEMES[kind] for qw in ckpt.quantized.values())
    assert ckpt.config.tie_word_embeddings is tie
    assert_exact(ckpt)  # q/k: the rows of codes and scales were un-permuted like the float rows
    notes = " ".join(ckpt.source["notes"])
    assert f"embed_tokens.weight ({kind}) kept as float32" in notes
    assert ("the tied lm_head uses its codes" in notes) is tie
    types = ckpt.source["weight_types"]
    assert types["layers.0.mlp.down_proj.weight"] == "float" and types["layers.0.self_attn.q_proj.weight"] == kind


@pytest.mark.parametrize("kind", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quants_import_exactly(tmp_path, kind):
    retype(tiny_wide_gguf(tmp_path / "f32.gguf", seed=12), tmp_path / "q.gguf", kind, np.random.default_rng(0))
    ckpt = load_gguf(tmp_path / "q.gguf")
    assert len(ckpt.quantized) == 8 and set(ckpt.quantized_types.values()) == {kind}  # 7 projections + lm_head
    qw = ckpt.quantized["layers.0.self_attn.k_proj.weight"]
    assert qw.scheme.super_group == 256 and qw.super_scales.shape == (128, 1)
    assert_exact(ckpt)


def test_types_without_exact_scheme_come_in_as_float_with_a_note(tmp_path):
    write_gguf(tmp_path / "f32.gguf", hf_weights(True, seed=13))
    retype(tmp_path / "f32.gguf", tmp_path / "q.gguf", "IQ4_NL", np.random.default_rng(1))
    ckpt = load_gguf(tmp_path / "q.gguf")
    assert ckpt.quantized == {}
    assert ckpt.source["notes"] == [("13 IQ4_NL tensors dequantized to float32 (then the plan decides): no exact "
                                     "scheme; nearest exact type Q4_0 = int4-g32-sym-imported")]


def compile_tiny(path: Path, out: Path, **quant):
    from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
    from bitsmith.pipeline import compile_model
    from bitsmith.runtime.artifact import load_artifact

    options = CompileOptions(dtype="float32", quant=QuantOptions(**quant), target=TargetOptions(name="none"),
                             memory=MemoryOptions(context=64, kv_dtype="float32"))
    return load_artifact(compile_model(path, out, options))


def reference_logits(artifact, ids: list[int]) -> np.ndarray:
    from bitsmith.tools.run import open_session

    return np.asarray(open_session(artifact, "reference", 64).prefill(ids))


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K"])
def test_compiled_artifact_keeps_the_codes(tmp_path, kind):
    """The artifact stores the imported codes unchanged (plan: method imported, edge layers and the tied lm_head
    too) and its logits on the reference executor are the dequantized float model's; --requantize drops them."""
    from bitsmith.tools.export import quantized_weights

    src = tmp_path / "q.gguf"
    if kind.endswith("_K"):
        retype(tiny_wide_gguf(tmp_path / "f32.gguf", seed=14), src, kind, np.random.default_rng(2))
    else:
        write_gguf(tmp_path / "f32.gguf", hf_weights(True, seed=14))
        retype(tmp_path / "f32.gguf", src, kind)
    ckpt = load_gguf(src)
    imported = compile_tiny(src, tmp_path / "imp")
    plan = imported.manifest["ir"]["meta"]["precision_plan"]
    assert {name for name, s in plan.items() if s and s["method"] == "imported"} == set(ckpt.quantized)
    dense = compile_tiny(src, tmp_path / "dense", requantize=True)
    assert not any(dense.manifest["ir"]["meta"].get("precision_plan", {}).values())  # no plan: all float
    ids = [int(i) for i in np.random.default_rng(3).integers(3, len(tokens_and_merges()[0]), size=12)]
    ours, ref = reference_logits(imported, ids), reference_logits(dense, ids)
    assert float(np.abs(ours - ref).max()) <= 1e-5 * float(np.abs(ref).max())
    stored = quantized_weights(imported)
    assert set(stored) == set(ckpt.quantized)
    for name, qw in ckpt.quantized.items():  # the packed parts are the source's codes: the same GGUF bytes
        assert stored[name].scheme.name == qw.scheme.name
        assert np.array_equal(encode(stored[name], ckpt.quantized_types[name]), encode(qw)), name
