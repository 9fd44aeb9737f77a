"""Random Llama checkpoints of any shape (a 1.7B or 8B stand-in), written shard by shard in bounded memory."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import numpy_dtype, safetensors_header

CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")
CHUNK_ELEMENTS = 16 << 20  # random values drawn per step: 64 MB of fp32, whatever the tensor's size


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    max_position: int = 4096

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(HF name, shape) of every tensor, in file order."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        names = [("model.embed_tokens.weight", (self.vocab, h))]
        for i in range(self.layers):
            p = f"model.layers.{i}"
            names += [(f"{p}.input_layernorm.weight", (h,)), (f"{p}.self_attn.q_proj.weight", (h, h)),
                      (f"{p}.self_attn.k_proj.weight", (kv, h)), (f"{p}.self_attn.v_proj.weight", (kv, h)),
                      (f"{p}.self_attn.o_proj.weight", (h, h)), (f"{p}.post_attention_layernorm.weight", (h,)),
                      (f"{p}.mlp.gate_proj.weight", (self.intermediate, h)),
                      (f"{p}.mlp.up_proj.weight", (self.intermediate, h)),
                      (f"{p}.mlp.down_proj.weight", (h, self.intermediate))]
        names.append(("model.norm.weight", (h,)))
        if not self.tied:
            names.append(("lm_head.weight", (self.vocab, h)))
        return names

    def parameters(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.tensors())

    def hf_config(self, dtype: str) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
                "num_hidden_layers": self.layers, "intermediate_size": self.intermediate,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
                "tie_word_embeddings": self.tied, "max_position_embeddings": self.max_position,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "torch_dtype": dtype,
                "bos_token_id": 1, "eos_token_id": 2}


# the shapes of the stand-ins (random weights: speed and memory, not quality)
SHAPES = {
    "smollm2-1.7b": LlamaShape(hidden=2048, layers=24, intermediate=8192, heads=32, kv_heads=32, vocab=49152, tied=True),
    "llama3-8b": LlamaShape(hidden=4096, layers=32, intermediate=14336, heads=32, kv_heads=8, vocab=128256,
                            tied=False, max_position=8192),
}


def _values(rng: np.random.Generator, name: str, shape: tuple[int, ...], dtype: np.dtype) -> Iterator[np.ndarray]:
    """The tensor's values a chunk at a time: norms near 1, matrices N(0, 0.02^2) (a trained model's scale)."""
    size = int(np.prod(shape))
    for start in range(0, size, CHUNK_ELEMENTS):
        n = min(CHUNK_ELEMENTS, size - start)
        x = rng.standard_normal(n, dtype=np.float32)
        x *= 0.02
        if len(shape) == 1:
            x += 1.0
        yield x.astype(dtype)


def _shards(tensors: list[tuple[str, tuple[int, ...]]], itemsize: int, shard_bytes: int) -> list[list]:
    shards: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = int(np.prod(shape)) * itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_padded_tokenizer(source: str | Path, directory: str | Path, vocab_size: int) -> None:
    """Copy a BPE tokenizer (tokenizer.json and its config files) from the directory `source`, its vocabulary
    padded with unused tokens to exactly `vocab_size`: converters that size the embedding by the vocabulary
    (llama.cpp's convert_hf_to_gguf.py) then agree with config.json."""
    source, directory = Path(source), Path(directory)
    data = json.loads((source / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    if not isinstance(vocab, dict) or len(vocab) > vocab_size:
        raise BitsmithError(f"cannot pad the tokenizer of {source} to {vocab_size} tokens", where="synthetic model",
                            fix="use a BPE tokenizer with at most vocab_size tokens")
    for token_id in range(len(vocab), vocab_size):
        vocab[f"<|unused_{token_id}|>"] = token_id
    (directory / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).exists():
            (directory / name).write_text((source / name).read_text())


def write_random_llama(directory: str | Path, shape: LlamaShape, dtype: str = "bfloat16",
                       shard_bytes: int = 2 << 30, seed: int = 0, progress=None) -> Path:
    """Write config.json, model-0000k-of-0000n.safetensors shards and their index; memory stays one chunk."""
    if dtype not in CHECKPOINT_DTYPES:
        raise BitsmithError(f"dtype {dtype!r} is not a checkpoint dtype", where="write_random_llama",
                            fix=f"use one of {CHECKPOINT_DTYPES}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    np_dtype = numpy_dtype(dtype)
    rng = np.random.default_rng(seed)
    shards = _shards(shape.tensors(), np_dtype.itemsize, shard_bytes)
    weight_map = {}
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        weight_map.update({name: file for name, _ in shard})
        with open(directory / file, "wb") as f:
            f.write(safetensors_header(((name, np_dtype, tshape) for name, tshape in shard), {"format": "pt"}))
            for name, tshape in shard:
                for chunk in _values(rng, name, tshape, np_dtype):
                    chunk.tofile(f)
                    if progress is not None:
                        progress.update(chunk.nbytes)
    total = shape.parameters() * np_dtype.itemsize
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (directory / "config.json").write_text(json.dumps(shape.hf_config(dtype), indent=1))
    (directory / "bitsmith-synthetic.json").write_text(json.dumps({"shape": asdict(shape), "dtype": dtype,
                                                                   "seed": seed}, indent=1))
    return directory
