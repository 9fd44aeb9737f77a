"""GGUF files of each supported architecture, made from tiny random models by llama.cpp's own converter and quantizer,
compiled by bitsmith and checked against transformers loading the same file (transformers dequantizes on load), or
against llama.cpp itself where transformers cannot read the architecture (gemma, llama with experts)."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import llamacpp_gguf as peer
from bitsmith.compiler.frontends.base import LoadedModel, checkpoint_to_model
from bitsmith.compiler.frontends.gguf import gguf_hf_checkpoint, load_gguf
from bitsmith.compiler.reference import ReferenceSession
from bitsmith.passes.canonicalize import canonical_model
from bitsmith.runtime.generate import generate
from bitsmith.runtime.sampling import SamplingParams

# architectures transformers' GGUF loader reads, and the zoo family that writes each
WITH_TRANSFORMERS = ["llama", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3_rope8", "phi3", "qwen3_moe"]
# transformers reads llama GGUFs with experts as dense llama, and without rope_freqs (llama3 RoPE scaling)
WITHOUT_TRANSFORMERS = ["gemma", "mixtral", "llama3"]
# transformers' GGUF loader ignores gemma2.attn_logit_softcapping / final_logit_softcapping (it keeps Gemma 2's
# defaults, 50 and 30), qwen3moe.expert_feed_forward_length (768) and gemma3.rope.scaling.*: it is given the config
# the file was converted from (the weights still come from the GGUF)
CONFIG_FROM_HF = ("gemma2", "qwen3_moe", "gemma3_rope8")
ALL = ["llama", "llama3", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_rope8", "phi3", "qwen3_moe",
       "mixtral"]
N_NEW = 16
REL = 1e-4  # teacher-forced logits of our IR vs transformers, both float32, relative to the largest logit
_LLAMACPP_LOGITS = """
import json, sys, numpy as np
from llama_cpp import Llama
ids, texts = json.loads(sys.argv[3]), json.loads(sys.argv[4])
m = Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, logits_all=True, verbose=False, n_threads=2)
m.eval(ids)
np.save(sys.argv[2], np.array(m.scores[:len(ids)], dtype=np.float32))
print(json.dumps([m.tokenize(t.encode(), add_bos=False, special=True) for t in texts]))
"""
TEXTS = ["Once upon a time, there was a little girl named Lily.", " She  said: \"Wow!\"\n\n123 + 4567",
         "<|im_start|>user\nHi<|im_end|>"]


@pytest.fixture(scope="module")
def made_cache(tmp_path_factory):
    """family -> folder with hf/ (the random model), F32.gguf, Q4_K_M.gguf and Q8_0.gguf, made once per family."""
    cache: dict[str, Path] = {}

    def make(family: str, shared_data: Path) -> Path:
        if family not in cache:
            cache[family] = peer.make_family(tmp_path_factory.mktemp(family), family, shared_data)
        return cache[family]

    return make


@pytest.fixture
def made(made_cache, shared_data):
    """The module's GGUF maker; through shared_data (TinyStories text for the tokenizers) the tests count as slow."""
    peer.peer()  # skip at once without the llama.cpp venv
    return lambda family: made_cache(family, shared_data)


def prompt_ids(vocab: int) -> list[int]:
    return [int(i) for i in np.random.default_rng(5).integers(3, min(vocab, 1000), size=7)]


def ours_loaded(path: Path) -> LoadedModel:
    loaded = load_gguf(path)
    return canonical_model(loaded if isinstance(loaded, LoadedModel) else checkpoint_to_model(loaded))


def teacher_forced_logits(loaded: LoadedModel, ids: list[int]) -> np.ndarray:
    from test_torch_export import teacher_forced

    return teacher_forced(loaded.module, loaded.weights, np.array(ids), n_prefill=4)


def compiled_greedy(path: Path, out: Path, ids: list[int], n: int, kernels: bool = False) -> list[int]:
    """Compile the GGUF (float32 weights and KV cache; host kernels, or none and the reference executor) and decode
    greedily from `ids`."""
    from bitsmith.pipeline import CompileOptions, MemoryOptions, TargetOptions, compile_model
    from bitsmith.runtime.artifact import load_artifact
    from bitsmith.tools.run import open_session

    options = CompileOptions(memory=MemoryOptions(context=64, kv_dtype="float32"),
                             target=TargetOptions(name="host" if kernels else "none"))
    artifact = load_artifact(compile_model(path, out, options))
    session = open_session(artifact, "compiled" if kernels else "reference", 64)
    return list(generate(session, ids, n, SamplingParams(temperature=0.0)))


def transformers_from_gguf(path: Path, family: str):
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(path.parent / "hf") if family in CONFIG_FROM_HF else None
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, config=config,
                                                             dtype=torch.float32).eval()


def assert_has_k_quants(path: Path) -> None:
    """llama.cpp silently falls back to other types for rows narrower than 256: the file must hold K-quants."""
    types = Counter(peer.tensor_types(path).values())
    assert types["Q4_K"] > 0 and types["Q6_K"] > 0, types


@pytest.mark.parametrize("kind", ["Q4_K_M", "Q8_0"])
@pytest.mark.parametrize("family", WITH_TRANSFORMERS)
def test_quantized_gguf_greedy_equals_transformers(made, family, kind, tmp_path):
    import torch

    path = made(family) / f"{kind}.gguf"
    if kind == "Q4_K_M":
        assert_has_k_quants(path)
    else:
        assert Counter(peer.tensor_types(path).values())["Q8_0"] > 0
    ref_model = transformers_from_gguf(path, family)
    ids = prompt_ids(ref_model.config.vocab_size)
    with torch.no_grad():
        ref_logits = ref_model(torch.tensor([ids + ids])).logits[0].numpy()
        expected = ref_model.generate(torch.tensor([ids]), max_new_tokens=N_NEW, min_new_tokens=N_NEW,
                                      do_sample=False)[0, len(ids):].tolist()
    ours = teacher_forced_logits(ours_loaded(path), ids + ids)
    assert float(np.abs(ours - ref_logits).max() / np.abs(ref_logits).max()) < REL
    # the K-quant file runs on host kernels, the Q8_0 one on the reference executor
    assert compiled_greedy(path, tmp_path / "art", ids, N_NEW, kernels=kind == "Q4_K_M") == expected


def llamacpp_run(path: Path, ids: list[int], out: Path) -> tuple[np.ndarray, list[list[int]]]:
    """llama.cpp's logits for `ids` (all positions) and its tokenization of TEXTS."""
    python, _ = peer.peer()
    proc = subprocess.run([str(python), "-c", _LLAMACPP_LOGITS, str(path), str(out), json.dumps(ids),
                           json.dumps(TEXTS)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-1500:]
    return np.load(out), json.loads(proc.stdout.strip().splitlines()[-1])


def assert_close_to_llamacpp(ours: np.ndarray, ref: np.ndarray, rel: float) -> None:
    """llama.cpp rounds activations to 8 bits inside quantized matmuls: logits agree to ~1e-2 of the largest, and
    the argmax wherever llama.cpp's top two are further apart than that."""
    scale = np.abs(ref).max()
    assert float(np.abs(ours - ref).max() / scale) < rel
    top2 = np.sort(ref, axis=-1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * rel * scale
    assert clear.any() and (ours.argmax(-1) == ref.argmax(-1))[clear].all()


@pytest.mark.parametrize("family", WITHOUT_TRANSFORMERS)
def test_gguf_transformers_cannot_read_matches_the_hf_model_and_llamacpp(made, family, tmp_path):
    """F32: our IR equals the HF model the file was converted from; Q4_K_M: llama.cpp's logits on the same file, and
    host kernels give the same greedy tokens as the IR."""
    import torch
    import transformers

    folder = made(family)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    ids = prompt_ids(hf_model.config.vocab_size)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids + ids])).logits[0].numpy()
    ours = teacher_forced_logits(ours_loaded(folder / "F32.gguf"), ids + ids)
    assert float(np.abs(ours - ref).max() / np.abs(ref).max()) < REL
    path = folder / "Q4_K_M.gguf"
    assert_has_k_quants(path)
    ref_q, _ = llamacpp_run(path, ids + ids, tmp_path / "logits.npy")
    loaded = ours_loaded(path)
    assert_close_to_llamacpp(teacher_forced_logits(loaded, ids + ids), ref_q, 3e-2)
    # on host kernels: the same greedy tokens as the loaded IR on the reference executor (just checked)
    expected = list(generate(ReferenceSession(loaded.module, loaded.weights, 64), ids, N_NEW,
                             SamplingParams(temperature=0.0)))
    assert compiled_greedy(path, tmp_path / "art", ids, N_NEW, kernels=True) == expected


@pytest.mark.parametrize("family", ALL)
def test_f32_gguf_gives_back_the_hf_state_dict(made, family):
    """Names, q/k permutation, Gemma's 1 + w norms and stacked experts undone: the converter's input comes back."""
    import transformers

    folder = made(family)
    cfg, state = gguf_hf_checkpoint(folder / "F32.gguf")
    original = transformers.AutoModelForCausalLM.from_pretrained(folder / "hf").state_dict()
    if cfg["tie_word_embeddings"]:
        original.pop("lm_head.weight")
    assert set(state) == set(original)
    for name, value in original.items():
        np.testing.assert_allclose(state[name], value.numpy(), rtol=0, atol=1e-6, err_msg=name)
    hf_cfg = transformers.AutoConfig.from_pretrained(folder / "hf")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "vocab_size", "moe_intermediate_size", "num_local_experts", "num_experts_per_tok", "sliding_window",
                "head_dim", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
                "tie_word_embeddings", "rms_norm_eps", "partial_rotary_factor"):
        if getattr(hf_cfg, key, None) is not None:
            assert cfg.get(key) == pytest.approx(getattr(hf_cfg, key, None), rel=1e-6), key


@pytest.mark.parametrize("family", ALL)
def test_gguf_tokenizer_and_chat_template_match_llamacpp(made, family, tmp_path):
    from tokenizers import Tokenizer

    from bitsmith.compiler.frontends.gguf import _metadata, _open_reader
    from bitsmith.compiler.frontends.gguf_tokenizer import gguf_tokenizer

    path = made(family) / "Q8_0.gguf"
    spec = gguf_tokenizer(path, _metadata(_open_reader(path), path))
    assert spec.chat_template == peer.TEMPLATE
    _, expected = llamacpp_run(path, [1, 2], tmp_path / "logits.npy")
    ours = Tokenizer.from_str(spec.files["tokenizer.json"].decode())
    for text, ids in zip(TEXTS, expected):
        assert ours.encode(text, add_special_tokens=False).ids == ids, text
