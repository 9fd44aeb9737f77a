"""GGUF files made the way users get them: a tiny random HF model of a family (tests/family_zoo.py), converted by
llama.cpp's convert_hf_to_gguf.py and quantized by llama_model_quantize, both run in the llama.cpp peer's venv
(bench/peers/setup_llamacpp.sh). Without that venv the tests that need it skip, saying so."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

VENV = Path(os.environ.get("BITSMITH_LLAMACPP_VENV", Path.home() / ".cache" / "bitsmith" / "llamacpp-venv"))
VOCAB = 2048  # TinyStories-656K's BPE vocabulary; sentencepiece vocabularies are padded up to it by the converter
# llama_ftype values (llama.h) of the files the tests make
FTYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K_M": 12,
          "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q6_K": 18, "IQ4_NL": 25, "IQ3_S": 26, "IQ4_XS": 30, "BF16": 32,
          "TQ1_0": 36, "TQ2_0": 37}
# K-quants need rows that are multiples of 256 (llama.cpp falls back to other types for narrower tensors)
WIDE = dict(hidden_size=256, intermediate_size=512, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
            head_dim=64, max_position_embeddings=128)
FAMILY_OVERRIDES = {  # Gemma 2/3: llama.cpp scales queries by 1/sqrt(head_dim), transformers by query_pre_attn_scalar
    "gemma2": dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=256),
    "gemma3": dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=256),
    # transformers' GGUF loader ignores qwen3.attention.key_length and assumes Qwen3's head_dim of 128
    "qwen3": dict(head_dim=128),
    "qwen3_moe": dict(head_dim=128, moe_intermediate_size=256),
    "mixtral": dict(intermediate_size=256),
}
# variants: name -> (zoo family, overrides). Gemma 3 4B+ scales RoPE linearly on its global layers only, every 6th
# (a GGUF does not store the pattern: llama.cpp and transformers both assume 5 sliding layers, then 1 global)
VARIANTS = {"gemma3_rope8": ("gemma3", {"num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + [
    "full_attention"], "rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                           "full_attention": {"rope_type": "linear", "factor": 8.0,
                                                              "rope_theta": 1000000.0}}})}
# Gemma 1-3 and Phi-3 ship sentencepiece vocabularies (llama.cpp's Gemma and Gemma 2 converters read nothing else)
SENTENCEPIECE_FAMILIES = ("gemma", "gemma2", "gemma3", "phi3")

# convert_hf_to_gguf.py refuses a BPE tokenizer whose pre-tokenizer hash it does not know (ours is TinyStories'):
# run it with that check answering "gpt-2" (GPT-2's split, which ours uses) instead of raising.
_CONVERT = """
import runpy, sys
from pathlib import Path
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
from conversion import base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""
_QUANTIZE = """
import sys, llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype, params.nthread, params.pure = int(sys.argv[3]), 2, sys.argv[4] == "pure"
params.allow_requantize = len(sys.argv) > 5 and sys.argv[5] == "requantize"
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""
_SENTENCEPIECE = """
import sys, sentencepiece as spm
spm.SentencePieceTrainer.train(input=sys.argv[1], model_prefix=sys.argv[2], vocab_size=int(sys.argv[3]),
                               model_type="bpe", character_coverage=1.0, byte_fallback=True,
                               user_defined_symbols=["<start_of_turn>", "<end_of_turn>"], minloglevel=2)
"""


# ggml types llama_model_quantize refuses without an importance matrix, which its C++ API takes as a std::map:
# these are quantized tensor by tensor through ggml_quantize_chunk (equal importance for every column).
_GGML_QUANTIZE = """
import ctypes, sys
import numpy as np
import gguf
src, dst, libdir, kind = sys.argv[1:5]
T = gguf.GGMLQuantizationType[kind]
lib = ctypes.CDLL(f"{libdir}/libggml-base.so")
lib.ggml_quantize_chunk.restype = ctypes.c_size_t
lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                    ctypes.c_int64, ctypes.c_void_p]
reader = gguf.GGUFReader(src)
writer = gguf.GGUFWriter(dst, reader.fields["general.architecture"].contents())
for field in reader.fields.values():
    if not field.name.startswith("GGUF.") and field.name != "general.architecture":
        sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), field.types[0], sub)
block, size = gguf.GGML_QUANT_SIZES[T]
for t in reader.tensors:
    x = np.ascontiguousarray(np.array(t.data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)]))
    if x.ndim == 2 and x.shape[1] % block == 0:
        out = np.zeros((x.shape[0], x.shape[1] // block * size), dtype=np.uint8)
        imatrix = np.ones(x.shape[1], dtype=np.float32)
        n = lib.ggml_quantize_chunk(int(T), x.ctypes.data, out.ctypes.data, 0, x.shape[0], x.shape[1],
                                    imatrix.ctypes.data)
        assert n == out.nbytes, (n, out.nbytes)
        writer.add_tensor(t.name, out, raw_dtype=T)
    else:
        writer.add_tensor(t.name, x)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
"""


def peer() -> tuple[Path, str]:
    """(venv python, convert_hf_to_gguf.py), or skip the test saying what is missing."""
    env_file = VENV / "llamacpp.env"
    if not env_file.exists():
        pytest.skip(f"no llama.cpp peer at {VENV} (run bench/peers/setup_llamacpp.sh)")
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)
    convert = env.get("LLAMACPP_CONVERT", "")
    if not Path(convert).exists():
        pytest.skip(f"no convert_hf_to_gguf.py recorded in {env_file} (rerun setup_llamacpp.sh)")
    return VENV / "bin" / "python", convert


def _run(args: list, what: str, timeout: float = 600) -> None:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{what} failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")


def write_hf_dir(family: str, directory: Path, shared_data: Path, seed: int = 0) -> Path:
    """A random zoo model of `family`, K-quant wide, saved with a tokenizer convert_hf_to_gguf.py accepts."""
    from family_zoo import zoo_model

    family, extra = VARIANTS.get(family, (family, {}))
    overrides = {**WIDE, **FAMILY_OVERRIDES.get(family, {}), **extra}
    if family == "phi3":
        overrides.pop("head_dim")  # Phi-3 derives it
    model = zoo_model(family, seed=seed, **overrides)
    model.save_pretrained(directory)
    if family in SENTENCEPIECE_FAMILIES:
        python, _ = peer()
        _run([python, "-c", _SENTENCEPIECE, shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt",
              directory / "tokenizer", 1000], "training a sentencepiece tokenizer")
        config = {"tokenizer_class": "LlamaTokenizer", "chat_template": TEMPLATE}  # Phi-3's converter reads the class
        (directory / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        write_bpe_tokenizer(directory, shared_data / "tinystories-valid-subset" / "tinystories_valid_head.txt")
    return directory


SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


def write_bpe_tokenizer(directory: Path, text: Path, vocab: int = VOCAB) -> None:
    """A GPT-2-style byte-level BPE (as Qwen, Llama 3, Phi-4 ship) trained on `text`, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train([str(text)], trainer)
    tok.save(str(directory / "tokenizer.json"))
    # GPT2Tokenizer: Phi-3's converter then reads tokenizer.json rather than a sentencepiece tokenizer.model
    config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
              "chat_template": TEMPLATE, "add_bos_token": False}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


def convert(hf_dir: Path, out: Path, outtype: str = "f32") -> Path:
    python, script = peer()
    _run([python, "-c", _CONVERT, script, hf_dir, "--outfile", out, "--outtype", outtype], "convert_hf_to_gguf.py")
    return out


def quantize(src: Path, dst: Path, ftype: str, pure: bool = False, allow_requantize: bool = False) -> Path:
    """llama_model_quantize `src` to `ftype`; allow_requantize: from an already quantized file (its values)."""
    python, _ = peer()
    _run([python, "-c", _QUANTIZE, src, dst, FTYPES[ftype], "pure" if pure else "mixed",
          "requantize" if allow_requantize else "no"], f"llama_model_quantize {ftype}")
    return dst


def quantize_with_imatrix(src: Path, dst: Path, kind: str) -> Path:
    """Every matrix of the F32 GGUF `src` as ggml type `kind` (IQ1_S ... IQ3_XXS), with an all-ones importance matrix."""
    python, _ = peer()
    env = dict(line.split("=", 1) for line in (VENV / "llamacpp.env").read_text().splitlines() if "=" in line)
    _run([python, "-c", _GGML_QUANTIZE, src, dst, env.get("LLAMACPP_LIBDIR", ""), kind], f"ggml_quantize_chunk {kind}")
    return dst


def make_family(folder: Path, family: str, shared_data: Path) -> Path:
    """folder/hf (the random model), F32.gguf, Q4_K_M.gguf and Q8_0.gguf of `family`."""
    write_hf_dir(family, folder / "hf", shared_data)
    convert(folder / "hf", folder / "F32.gguf")
    for kind in ("Q4_K_M", "Q8_0"):
        quantize(folder / "F32.gguf", folder / f"{kind}.gguf", kind)
    return folder


def tensor_types(path: Path) -> dict[str, str]:
    """GGUF tensor name -> its ggml type name, read back from the file."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


# llama.cpp scoring `bitsmith eval`'s windows (tools/evaluate.py: the same token ids, each window evaluated from an
# empty cache with every position's logits): the NLL of window[1:] given its prefix, in float64; and greedy decoding
_LLAMACPP_NLL = """
import json, sys, numpy as np
from llama_cpp import Llama
windows = json.loads(open(sys.argv[2]).read())
m = Llama(model_path=sys.argv[1], n_ctx=max(len(w) for w in windows), n_batch=512, logits_all=True, verbose=False,
          n_threads=2)
nll = []
for w in windows:
    m.reset()
    m.eval(w)
    logits = np.array(m.scores[:len(w) - 1], dtype=np.float64)
    top = logits.max(axis=-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))
    nll.append(-logp[np.arange(len(w) - 1), w[1:]])
np.save(sys.argv[3], np.concatenate(nll))
"""
_LLAMACPP_GREEDY = """
import json, sys
from llama_cpp import Llama
ids, n = json.loads(sys.argv[2]), int(sys.argv[3])
m = Llama(model_path=sys.argv[1], n_ctx=len(ids) + n + 1, n_batch=512, verbose=False, n_threads=2)
out = []
for tok in m.generate(ids, temp=0.0, top_k=1, reset=True):
    out.append(int(tok))
    if len(out) == n:
        break
print(json.dumps(out))
"""


def llamacpp_nll(path: Path, windows: list[list[int]], workdir: Path, timeout: float = 1200) -> np.ndarray:
    """float64 [scored tokens]: llama.cpp's NLL of every window[1:] token (windows as tools/evaluate.windows_of)."""
    python, _ = peer()
    (workdir / "windows.json").write_text(json.dumps(windows))
    _run([python, "-c", _LLAMACPP_NLL, path, workdir / "windows.json", workdir / "nll.npy"], "llama.cpp NLL",
         timeout)
    return np.load(workdir / "nll.npy")


def llamacpp_greedy(path: Path, ids: list[int], n: int, timeout: float = 600) -> list[int]:
    """llama.cpp's n greedy tokens after the prompt `ids` (argmax; no BOS added beyond what `ids` holds)."""
    python, _ = peer()
    proc = subprocess.run([str(python), "-c", _LLAMACPP_GREEDY, str(path), json.dumps(ids), str(n)],
                          capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"llama.cpp greedy failed ({proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_LLAMACPP_ALL_LOGITS = """
import json, sys, numpy as np
from llama_cpp import Llama
ids = json.loads(open(sys.argv[2]).read())
m = Llama(model_path=sys.argv[1], n_ctx=len(ids), n_batch=512, logits_all=True, verbose=False, n_threads=2)
m.eval(ids)
np.save(sys.argv[3], np.array(m.scores[:len(ids)], dtype=np.float32))
"""


def llamacpp_logits(path: Path, ids: list[int], workdir: Path) -> np.ndarray:
    """float32 [len(ids), vocab]: llama.cpp's logits at every position of `ids`, evaluated as one batch."""
    python, _ = peer()
    (workdir / "ids.json").write_text(json.dumps(ids))
    _run([python, "-c", _LLAMACPP_ALL_LOGITS, path, workdir / "ids.json", workdir / "logits.npy"], "llama.cpp logits")
    return np.load(workdir / "logits.npy")


def f32_expansion(src: Path, dst: Path) -> Path:
    """`src` with every tensor dequantized to F32 by gguf-py (same metadata): the model the file's codes stand for,
    which llama.cpp then runs in float (its quantized kernels round activations to 8 bits; on F32 it does not)."""
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name not in ("general.architecture", "general.file_type"):
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    writer.add_file_type(0)  # LLAMA_FTYPE_ALL_F32
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        writer.add_tensor(t.name, np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst
