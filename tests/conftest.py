"""Shared fixtures: tiny random HF models of every family, the tiny compiled artifact, the test kernel cache and
the location of ../shared/data."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from bitsmith.compiler.config import ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("BITSMITH_DATA", REPO_ROOT.parent / "shared" / "data"))

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Kernels the tests build go here, never into the user's ~/.cache; it persists between runs (a warm cache is
# what keeps the fast tier fast). $BITSMITH_TEST_KERNEL_CACHE moves it.
TEST_KERNEL_CACHE = Path(os.environ.get("BITSMITH_TEST_KERNEL_CACHE", REPO_ROOT / ".test-cache" / "kernels"))


def pytest_configure(config):
    """Set before any test runs, so CLI subprocesses the tests start inherit it too."""
    os.environ["BITSMITH_KERNEL_CACHE"] = str(TEST_KERNEL_CACHE)


def pytest_collection_modifyitems(config, items):
    """Every test on real models or text (the `shared_data` fixture) is slow: the fast tier, `-m "not slow"`,
    compiles only tiny random models."""
    for item in items:
        if "shared_data" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real models and text not found at {SHARED_DATA} (set BITSMITH_DATA)")
    return SHARED_DATA


def tiny_hf_config(family: str, tie: bool = False):
    """A small random config of `family` (GQA, 2 layers) built from transformers' own config classes."""
    import transformers

    common = dict(
        vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rms_norm_eps=1e-5, tie_word_embeddings=tie, initializer_range=0.1,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[family]
    extra = {"head_dim": 16} if family in ("llama", "qwen3") else {}
    if family == "mistral":
        extra["sliding_window"] = None
    cfg = cls(**common, **extra)
    cfg._attn_implementation = "eager"
    return cfg


def make_tiny_hf_model(family: str, tie: bool = False, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family, tie), dtype=torch.float32)
    model.eval()
    return model


def save_tiny_hf_model(directory: Path, family: str, tie: bool = False, seed: int = 0):
    model = make_tiny_hf_model(family, tie, seed)
    model.save_pretrained(directory)
    return model


@pytest.fixture(params=FAMILIES)
def tiny_hf_dir(request, tmp_path):
    """(family, directory, torch model) for a tiny random model saved in HF layout."""
    directory = tmp_path / request.param
    model = save_tiny_hf_model(directory, request.param)
    return request.param, directory, model


@pytest.fixture(scope="session")
def host_kernels(tmp_path_factory):
    """build(specs) -> the loaded host library of those kernels, built through the kernel cache (each kernel an
    object file in the test cache: a warm run only links), for tests that call many kernels of one family."""
    import tvm

    from bitsmith.codegen.build import build_kernel_library

    def build(specs) -> object:
        path = tmp_path_factory.mktemp("kernels") / "kernels.so"
        build_kernel_library(specs, "host", path)
        return tvm.runtime.load_module(str(path))

    return build


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """The tiny random Llama (seed 0) saved once per session in HF layout; treat it as read-only."""
    directory = tmp_path_factory.mktemp("tiny-llama") / "model"
    save_tiny_hf_model(directory, "llama")
    return directory


@pytest.fixture(scope="session")
def tiny_artifact(tiny_llama_dir, tmp_path_factory):
    """compile(options) -> the tiny Llama's artifact for those CompileOptions, compiled once per session and
    shared by every test that asks for the same options; treat it as read-only (copy it to modify it)."""
    from bitsmith.pipeline import compile_model

    built: dict = {}

    def compile(options) -> Path:
        if options not in built:
            built[options] = compile_model(tiny_llama_dir, tmp_path_factory.mktemp("tiny-artifact") / "art", options)
        return built[options]

    return compile


def random_model(config, seed: int = 0):
    """(module, float32 weights) for a ModelConfig, with random values of realistic scale."""
    from bitsmith.compiler.config import expected_weight_shapes
    from bitsmith.compiler.frontends.llama import build_llama_module

    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in expected_weight_shapes(config).items():
        scale = 1.0 if len(shape) == 1 else 0.3
        weights[name] = (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                         else scale * rng.standard_normal(shape)).astype(np.float32)
    return build_llama_module(config, {}), weights


RANDOM_CONFIGS = {
    "gqa": ModelConfig(architecture="llama", vocab_size=40, hidden_size=32, intermediate_size=40, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=8),
    "qwen3-interleaved": ModelConfig(architecture="qwen3", vocab_size=40, hidden_size=24, intermediate_size=40,
                                     num_layers=3, num_heads=3, num_kv_heads=1, head_dim=8, qk_norm=True,
                                     rope_style="interleaved", tie_word_embeddings=True),
    "window": ModelConfig(architecture="mistral", vocab_size=40, hidden_size=32, intermediate_size=40, num_layers=1,
                          num_heads=2, num_kv_heads=2, head_dim=16, sliding_window=4),
}


def attach_char_tokenizer(artifact_dir: Path) -> None:
    """Give an artifact of the tiny random model a character-level tokenizer (a..z -> ids 3..28, EOS 2)."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers

    from bitsmith.runtime.artifact import sha256_of

    vocab = {chr(97 + i): i + 3 for i in range(26)} | {"<unk>": 0, " ": 29, "</s>": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tok.save(str(artifact_dir / "tokenizer.json"))
    manifest = json.loads((artifact_dir / "manifest.json").read_text())
    manifest["tokenizer"] = {"kind": "hf", "files": ["tokenizer.json"], "bos_token_id": None, "eos_token_ids": [2],
                             "add_bos": False, "chat_template": None}
    path = artifact_dir / "tokenizer.json"
    manifest["files"]["tokenizer.json"] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    (artifact_dir / "manifest.json").write_text(json.dumps(manifest))


def packed_matmul_case(spec, rows: int, seed: int = 0):
    """(x [rows, in], qweight, scales, zeros, reference y) for a quantized GEMV/GEMM spec: random codes,
    realistic fp16 scales (and zeros), y from the numpy dequantization `dequantize_packed`."""
    from bitsmith.compiler.ops.quant import dequantize_packed
    from bitsmith.passes.quant.packing import pack

    rng = np.random.default_rng(seed)
    q = rng.integers(0, 1 << spec.bits, (spec.out_features, spec.in_features), dtype=np.uint8)
    scales = (rng.random((spec.out_features, spec.n_groups)) * 0.05 + 0.005).astype(np.float16)
    zeros = None if spec.sym else (rng.random((spec.out_features, spec.n_groups)) * ((1 << spec.bits) - 1)
                                   ).astype(np.float16)
    qweight = pack(q, spec.bits)
    x = rng.standard_normal((rows, spec.in_features)).astype(np.float32)
    attrs = {"bits": spec.bits, "group_size": spec.group_size, "in_features": spec.in_features, "sym": spec.sym}
    return x, qweight, scales, zeros, x @ dequantize_packed(qweight, scales, zeros, attrs).T


def assert_close_to_scale(y: np.ndarray, ref: np.ndarray, rtol: float) -> None:
    """float32 y of ref's shape, max |y - ref| <= rtol * max |ref|."""
    assert y.shape == ref.shape and y.dtype == np.float32
    err = float(np.abs(y - ref).max())
    assert err <= rtol * float(np.abs(ref).max()), f"max abs err {err:.3g} vs max|y| {np.abs(ref).max():.3g}"
