"""GGUF export checked by gguf-py's decoder (every tensor dequantizes to our weight bit for bit) and by llama.cpp itself
(llama-cpp-python in its own venv, through a subprocess; those tests skip saying so when it is absent)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from bitsmith.cli import main
from bitsmith.compiler.frontends.gguf import gguf_hf_checkpoint
from bitsmith.compiler.gguf_blocks import decode, encode, row_bytes
from bitsmith.errors import BitsmithError
from bitsmith.options import CompileOptions, MemoryOptions, QuantOptions, TargetOptions
from bitsmith.runtime.artifact import load_artifact
from bitsmith.runtime.quant_scheme import QuantizedWeight, QuantScheme, dequantize
from bitsmith.tools.export import ExportOptions, dense_weights, export, quantized_weights
from bitsmith.tools.export_gguf import as_block_type

VENV = Path(os.environ.get("BITSMITH_LLAMACPP_VENV", Path.home() / ".cache" / "bitsmith" / "llamacpp-venv"))
# every exact mapping once on the zoo Llama (hidden 64, ffn 128): repeated group scales, per channel, widened codes
EXACT = (("self_attn.q_proj", "int4-g32"), ("self_attn.k_proj", "int8-pc"), ("self_attn.v_proj", "int4-g64"),
         ("self_attn.o_proj", "int5-g32"), ("mlp.gate_proj", "int3-g32"), ("mlp.up_proj", "int2-g64"),
         ("mlp.down_proj", "int4-g128"), ("lm_head", "int6-g32"))
EXPECTED_TYPES = {"attn_q": "Q4_0", "attn_k": "Q8_0", "attn_v": "Q4_0", "attn_output": "Q5_0", "ffn_gate": "Q4_0",
                  "ffn_up": "Q4_0", "ffn_down": "Q4_0", "output": "Q8_0", "token_embd": "F16", "attn_norm": "F32",
                  "ffn_norm": "F32", "output_norm": "F32"}
# llama.cpp rounds activations to 8 bits in quantized matmuls (16 in F16 ones): logits agree to ~1e-2 of the largest
LLAMACPP_REL = 3e-2
_LLAMACPP_LOGITS = """
import json, sys
import numpy as np
from llama_cpp import Llama
path, ids = sys.argv[1], json.loads(sys.argv[2])
m = Llama(model_path=path, n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
m.eval(ids)
print(json.dumps(np.array(m.scores[:len(ids)], dtype=np.float32).tolist()))
"""


def llamacpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits at every position of `ids`, or skip the test saying llama-cpp-python is absent."""
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no llama.cpp peer (llama-cpp-python) at {VENV} (run bench/peers/setup_llamacpp.sh)")
    proc = subprocess.run([str(python), "-c", _LLAMACPP_LOGITS, str(path), json.dumps(ids)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return np.asarray(json.loads(proc.stdout.strip().splitlines()[-1]), dtype=np.float32)


def _options(schemes=(), context: int = 128) -> CompileOptions:
    return CompileOptions(quant=QuantOptions("rtn", bits=4, group_size=32, keep_default=False, schemes=schemes),
                          memory=MemoryOptions(context=context), target=TargetOptions("none"))


@pytest.fixture(scope="module")
def zoo_artifact(tmp_path_factory):
    """compile(family, schemes) -> an artifact of the zoo model of `family` (random, ffn 128: rows fit blocks of
    32), every linear quantized (int4-g32 unless `schemes` says), no kernels; built once per module."""
    from family_zoo import zoo_model

    from bitsmith.pipeline import compile_model

    built: dict = {}

    def compile(family: str, schemes=()) -> Path:
        if (family, schemes) not in built:
            folder = tmp_path_factory.mktemp(family)
            zoo_model(family).save_pretrained(folder / "hf")
            built[family, schemes] = compile_model(folder / "hf", folder / "art", _options(schemes))
        return built[family, schemes]

    return compile


def _ours(artifact: Path) -> dict[str, np.ndarray]:
    """IR weight name -> our dequantized float32 weight."""
    art = load_artifact(artifact)
    weights = {name: dequantize(qw) for name, qw in quantized_weights(art).items()}
    return weights | {n: np.asarray(w, dtype=np.float32) for n, w in dense_weights(art).items()}


def test_every_tensor_decodes_to_our_weight_exactly(zoo_artifact, tmp_path):
    """gguf-py reads the file back, bitsmith's GGUF frontend undoes llama.cpp's q/k permutation and names: every
    tensor equals our dequantized weight bit for bit, and the hyper-parameters give back the model's config."""
    artifact = zoo_artifact("llama", EXACT)
    report = export(artifact, tmp_path / "m.gguf", ExportOptions("gguf"))
    assert all(t.exact and t.max_abs_error == 0.0 for t in report.tensors)
    kinds = {t.name.split(".")[-2] if t.name.startswith("blk.") else t.name.split(".")[0]: t.target
             for t in report.tensors}
    assert kinds == EXPECTED_TYPES
    cfg, state = gguf_hf_checkpoint(tmp_path / "m.gguf")
    ours = _ours(artifact)
    assert {n.removeprefix("model.") for n in state} == set(ours)
    for name, w in state.items():
        np.testing.assert_array_equal(w, ours[name.removeprefix("model.")], err_msg=name)
    model = load_artifact(artifact).config
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["intermediate_size"], cfg["rope_theta"], cfg["rms_norm_eps"]) == (
        model["hidden_size"], model["num_layers"], model["num_heads"], model["num_kv_heads"], model["head_dim"],
        model["intermediate_size"], model["rope_theta"], model["rms_norm_eps"])


@pytest.mark.parametrize("form,bits,group", [("min", 4, 64), ("min", 5, -1), ("min", 3, 32), ("sym", 8, 128)])
def test_block_forms_of_schemes_decode_exactly(form, bits, group):
    """Min-form (imported) and per-channel schemes cut into blocks of 32: gguf-py's decoder gives our weight."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize

    rng = np.random.default_rng(bits)
    out, n = 6, 192
    scheme = QuantScheme(bits, group, form == "sym", "imported", offset=form == "min")
    ng = scheme.n_groups(n)
    qw = QuantizedWeight(rng.integers(0, 1 << bits, (out, n)).astype(np.uint8),
                         rng.uniform(0.01, 0.1, (out, ng)).astype(np.float16),
                         rng.uniform(-1, 0, (out, ng)).astype(np.float16) if form == "min" else None, scheme, n)
    kind, held = as_block_type(qw)
    assert kind == {("min", 4): "Q4_1", ("min", 5): "Q5_1", ("min", 3): "Q4_1", ("sym", 8): "Q8_0"}[form, bits]
    got = gguf_dequantize(encode(held, kind), GGMLQuantizationType[kind]).reshape(out, n)
    np.testing.assert_array_equal(got, dequantize(qw))


@pytest.mark.parametrize("kind", ["Q4_K", "Q6_K", "Q2_K"])
def test_k_quants_are_written_as_they_came(kind):
    """An imported K-quant weight is its own type, and its bytes are the source's."""
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (3, row_bytes(kind, 512)), dtype=np.uint8)
    data.reshape(3, -1, {"Q4_K": 144, "Q6_K": 210, "Q2_K": 84}[kind])[..., -2:] = [0, 60]  # finite f16 d / dmin
    got_kind, held = as_block_type(decode(kind, data, 512))
    assert got_kind == kind and np.array_equal(encode(held, kind), data)


@pytest.mark.parametrize("scheme,reason", [("int4-g32-asym", "zero points"), ("int4-g16-sym", "groups of 16")])
def test_scheme_without_a_gguf_type_is_refused_or_requantized(zoo_artifact, tmp_path, scheme, reason):
    """Refused naming the tensor, its scheme, why and the nearest type, leaving nothing behind; with
    --allow-requantize converted, each such tensor reported with its max abs error, which the file honours."""
    artifact = zoo_artifact("llama", (("self_attn.q_proj", scheme),))
    out = tmp_path / "m.gguf"
    with pytest.raises(BitsmithError) as err:
        export(artifact, out, ExportOptions("gguf"))
    text = str(err.value)
    assert "blk.0.attn_q.weight" in text and f"{scheme}-rtn" in text and reason in text and "Q4_" in text
    assert "--allow-requantize" in text and list(tmp_path.iterdir()) == []
    report = export(artifact, out, ExportOptions("gguf", allow_requantize=True))
    converted = {t.name: t for t in report.tensors if not t.exact}
    assert set(converted) == {"blk.0.attn_q.weight", "blk.1.attn_q.weight"}
    _, state = gguf_hf_checkpoint(out)
    ours = _ours(artifact)
    for layer in (0, 1):
        entry = converted[f"blk.{layer}.attn_q.weight"]
        assert entry.target in ("Q4_0", "Q4_1") and 0 < entry.max_abs_error < 0.05
        err = np.abs(state[f"model.layers.{layer}.self_attn.q_proj.weight"] - ours[f"layers.{layer}.self_attn.q_proj.weight"])
        assert float(err.max()) == pytest.approx(entry.max_abs_error)


def test_cli_prints_the_per_tensor_report_and_refuses_with_exit_code_2(zoo_artifact, tmp_path):
    artifact = zoo_artifact("llama")
    result = CliRunner().invoke(main, ["export", str(artifact), "--format", "gguf", "-o", str(tmp_path / "m.gguf")])
    assert result.exit_code == 0, result.output
    assert "blk.0.attn_q.weight" in result.output and "Q4_0" in result.output and "0 requantized" in result.output
    refused = zoo_artifact("llama", (("self_attn.q_proj", "int4-g32-asym"),))
    result = CliRunner().invoke(main, ["export", str(refused), "--format", "gguf", "-o", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "error:" in result.output and "nearest: Q4_1" in result.output
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_llamacpp_logits_match_the_reference_executor(zoo_artifact, tmp_path, family):
    """llama.cpp runs the exported file: its logits match our reference executor's on the artifact (llama.cpp
    quantizes activations to 8 bits: within 3e-2 of the largest logit, same argmax wherever the top two are apart)."""
    from bitsmith.tools.run import reference_session

    artifact = zoo_artifact(family)
    export(artifact, tmp_path / "m.gguf", ExportOptions("gguf"))
    ids = [int(i) for i in np.random.default_rng(5).integers(3, 90, size=12)]
    ref = llamacpp_logits(tmp_path / "m.gguf", ids)
    ours = np.asarray(reference_session(load_artifact(artifact), 64).prefill(ids), dtype=np.float32)
    scale = np.abs(ref).max()
    assert float(np.abs(ours - ref).max() / scale) < LLAMACPP_REL
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * LLAMACPP_REL * scale
    assert clear.any() and (ours.argmax(-1) == ref.argmax(-1))[clear].all()


def _compile_gguf(path: Path, out: Path, dtype: str | None = None) -> Path:
    from bitsmith.pipeline import compile_model

    return compile_model(path, out, CompileOptions(dtype=dtype, memory=MemoryOptions(context=128),
                                                   target=TargetOptions("none")))


def _tensor_bytes(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    return {t.name: (t.tensor_type.name, np.asarray(t.data).tobytes()) for t in GGUFReader(path).tensors}


def test_round_trip_keeps_codes_and_scales(zoo_artifact, tmp_path):
    """import(export(A)): the GGUF frontend gives back A's codes and scales bit for bit where A's scheme is a ggml
    type (groups of 32), the same dequantized weights where the export repeated scales or widened codes; and
    exporting the import again writes the same bytes."""
    artifact = zoo_artifact("llama", EXACT)
    export(artifact, tmp_path / "a.gguf", ExportOptions("gguf"))
    again = _compile_gguf(tmp_path / "a.gguf", tmp_path / "b")
    ours, theirs = quantized_weights(load_artifact(artifact)), quantized_weights(load_artifact(again))
    assert set(theirs) == set(ours)
    for name, qw in ours.items():
        got = theirs[name]
        assert got.scheme.method == "imported"
        if qw.scheme.group_size == 32 and qw.scheme.bits in (4, 5):
            assert got.scheme.short_name() == qw.scheme.short_name(), name
            np.testing.assert_array_equal(got.q, qw.q, err_msg=name)
            np.testing.assert_array_equal(got.scales, qw.scales, err_msg=name)
        np.testing.assert_array_equal(dequantize(got), dequantize(qw), err_msg=name)
    export(again, tmp_path / "b.gguf", ExportOptions("gguf"))
    assert _tensor_bytes(tmp_path / "b.gguf") == _tensor_bytes(tmp_path / "a.gguf")


def _peer():
    """tests/compiler/frontends/llamacpp_gguf.py: llama.cpp's converter, quantizer, greedy decoding and scoring."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "compiler" / "frontends"))
    import llamacpp_gguf

    return llamacpp_gguf


def test_q4_k_m_file_comes_back_byte_for_byte(shared_data, tmp_path):
    """A Q4_K_M file made by llama.cpp (tiny random Llama, rows of 256): imported, exported again, every quantized
    tensor has the file's bytes (K-quant super-blocks included), and with float32 storage of what stays dense the
    norms too; the embedding (a float table in the artifact) comes out as F32."""
    peer = _peer()
    peer.make_family(tmp_path, "llama", shared_data)
    source = tmp_path / "Q4_K_M.gguf"
    artifact = _compile_gguf(source, tmp_path / "art", dtype="float32")
    report = export(artifact, tmp_path / "out.gguf", ExportOptions("gguf"))
    assert all(t.exact for t in report.tensors)
    before, after = _tensor_bytes(source), _tensor_bytes(tmp_path / "out.gguf")
    assert {"Q4_K", "Q6_K"} <= {kind for kind, _ in before.values()}
    assert set(after) == set(before)
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed == ["token_embd.weight"] and after["token_embd.weight"][0] == "F32"


SMOLLM2 = Path.home() / ".cache" / "bitsmith" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
CHAT = "What is the capital of France?"
# logits: how far llama.cpp's 8-bit activations (Q4_1 x Q8_1 dot products) move a logit of ~25 (~1% of the largest,
# as on the tiny models); seen at its flips: 0.006-0.17
NEAR_TIE = 0.25
# SmolLM2 from its Q4_1 GGUF, host kernels: imported (codes kept; float32 storage of what stays dense, so the tied
# Q8_0 table comes back exactly) and requantized RTN int4 g32 sym (Q4_0 out; first/last layers and table F16)
SMOLLM2_VARIANTS = {"imported": {"dtype": "float32"},
                    "rtn-g32": {"quant": QuantOptions("rtn", 4, 32, requantize=True)}}


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """variant -> (artifact, its GGUF export), built once per module."""
    from bitsmith.pipeline import compile_model

    if not SMOLLM2.exists():
        pytest.skip(f"{SMOLLM2} is absent (`bitsmith compile` without MODEL fetches it)")
    built: dict = {}

    def make(variant: str) -> tuple[Path, Path]:
        if variant not in built:
            folder = tmp_path_factory.mktemp(variant)
            options = CompileOptions(memory=MemoryOptions(context=512), **SMOLLM2_VARIANTS[variant])
            artifact = compile_model(SMOLLM2, folder / "art", options)
            export(artifact, folder / "smollm2.gguf", ExportOptions("gguf"))
            built[variant] = artifact, folder / "smollm2.gguf"
        return built[variant]

    return make


@pytest.mark.slow
def test_smollm2_imported_q4_1_exports_the_source_files_tensors(smollm2):
    """Imported Q4_1 exported again: all 272 tensors have the source file's bytes (210 Q4_1, the tied Q8_0 table
    written once from the codes lm_head kept, 61 F32 norms)."""
    assert _tensor_bytes(smollm2("imported")[1]) == _tensor_bytes(SMOLLM2)


def test_smollm2_llamacpp_greedy_tokens_are_ours_up_to_near_ties(smollm2, shared_data):
    """llama.cpp's 64 greedy tokens on the imported export, fed back through the artifact (`bitsmith run`'s kernels):
    each is our argmax, or within NEAR_TIE of it (llama.cpp rounds activations to 8 bits and flips near-ties; it
    then continues from its own choice, so free-running greedy decoding parts at the first such flip)."""
    from bitsmith.runtime.tokenizer import encode_chat
    from bitsmith.tools.run import open_session

    peer = _peer()
    artifact, path = smollm2("imported")
    art = load_artifact(artifact)
    tok = art.tokenizer()
    chat = encode_chat(art.manifest["tokenizer"]["chat_template"], [{"role": "user", "content": CHAT}], tok)
    plain = tok.encode("Once upon a time, there was a little girl named Lily. She", add_bos=False)
    for ids in (chat, plain):
        theirs = peer.llamacpp_greedy(path, ids, 64)
        logits = np.asarray(open_session(art, "compiled", 512).prefill(ids + theirs[:-1]))[len(ids) - 1:]
        gaps = logits.max(axis=-1) - logits[np.arange(64), theirs]
        assert float(gaps.max()) < NEAR_TIE and int((gaps > 0).sum()) <= 3, [(i, g) for i, g in enumerate(gaps) if g]


_LLAMACPP_TOKENIZE = """
import json, sys
from llama_cpp import Llama
m = Llama(model_path=sys.argv[1], n_ctx=64, verbose=False, vocab_only=True)
print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=True) for t in json.loads(sys.argv[2])]))
"""
TEXTS = ["Once upon a time, there was a little girl named Lily.", " She  said: \"Wow!\"\n\n123 + 4567",
         "<|im_start|>user\nHi<|im_end|>", "naïve café — 2024年"]


@pytest.mark.slow
def test_smollm2_llamacpp_tokenizes_like_us(smollm2):
    """The exported tokenizer.ggml.* (gpt2 model, 'gpt-2' pre-tokenizer, merges, special tokens) splits text into
    the same ids under llama.cpp as the artifact's tokenizer.json does."""
    python = VENV / "bin" / "python"
    if not python.exists():
        pytest.skip(f"no llama.cpp peer (llama-cpp-python) at {VENV}")
    artifact, path = smollm2("imported")
    tok = load_artifact(artifact).tokenizer()
    proc = subprocess.run([str(python), "-c", _LLAMACPP_TOKENIZE, str(path), json.dumps(TEXTS)], check=False,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == [tok.encode(t, add_bos=False) for t in TEXTS]


def test_smollm2_int4_g32_llamacpp_greedy_and_perplexity(smollm2, shared_data, tmp_path):
    """RTN int4 g32 sym exported as Q4_0: llama.cpp gives `bitsmith run --chat`'s 64 greedy tokens (on this prompt no
    near-tie of ours falls within its activation rounding), and its perplexity on `bitsmith eval`'s windows of
    wikitext-2 is within 0.5% of bitsmith eval's on the artifact."""
    from bitsmith.runtime.generate import generate
    from bitsmith.runtime.sampling import SamplingParams
    from bitsmith.runtime.tokenizer import encode_chat
    from bitsmith.tools.evaluate import evaluate, windows_of
    from bitsmith.tools.run import open_session

    peer = _peer()
    artifact, path = smollm2("rtn-g32")
    art = load_artifact(artifact)
    tok = art.tokenizer()
    chat = encode_chat(art.manifest["tokenizer"]["chat_template"], [{"role": "user", "content": CHAT}], tok)
    ours = list(generate(open_session(art, "compiled", 512), chat, 64, SamplingParams(temperature=0.0), stop_ids=()))
    assert peer.llamacpp_greedy(path, chat, 64) == ours
    text = (shared_data / "wikitext-2-raw-test" / "wiki.test.raw").read_text(encoding="utf-8")
    ours = evaluate(artifact, text, 1024, 256, reference=artifact)
    nll = peer.llamacpp_nll(path, windows_of(tok.encode(text, add_bos=False)[:1024], 256, None), tmp_path)
    assert nll.size == ours.tokens
    assert abs(float(np.exp(nll.mean())) / ours.ppl - 1) < 0.005, (float(np.exp(nll.mean())), ours.ppl)
