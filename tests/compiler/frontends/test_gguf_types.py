"""Every GGUF tensor type llama.cpp makes and the gguf package dequantizes: legacy, K-quants, IQ, ternary, 16-bit.

One tiny llama GGUF (F32, from llama.cpp's converter) is re-quantized with every matrix in one type; bitsmith's
logits on it are compared with llama.cpp's own on the same file, and its weights with the F32 originals."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

import llamacpp_gguf as peer
from bitsmith.compiler.frontends.gguf import gguf_hf_checkpoint, load_gguf
from test_gguf_families import assert_close_to_llamacpp, llamacpp_run, ours_loaded, teacher_forced_logits

# llama_model_quantize ftype (or, for the IQ types it refuses without an importance matrix, the ggml type made
# through ggml_quantize_chunk) -> (ggml type every matrix gets, bound on the relative RMS error of each matrix vs F32:
# about 1.5x what was measured on these N(0, 0.02) weights)
TYPES = {
    "Q4_0": ("Q4_0", 0.13), "Q4_1": ("Q4_1", 0.12), "Q5_0": ("Q5_0", 0.065), "Q5_1": ("Q5_1", 0.06),
    "Q8_0": ("Q8_0", 0.01), "Q2_K": ("Q2_K", 0.45), "Q3_K_M": ("Q3_K", 0.23), "Q4_K_S": ("Q4_K", 0.11),
    "Q5_K_S": ("Q5_K", 0.055), "Q6_K": ("Q6_K", 0.027), "IQ4_NL": ("IQ4_NL", 0.12), "IQ4_XS": ("IQ4_XS", 0.12),
    "IQ3_S": ("IQ3_S", 0.25), "TQ1_0": ("TQ1_0", 1.0), "TQ2_0": ("TQ2_0", 1.0), "F16": ("F16", 1e-3),
    "BF16": ("BF16", 4e-3),
    "IQ3_XXS": ("IQ3_XXS", 0.27), "IQ2_S": ("IQ2_S", 0.37), "IQ2_XS": ("IQ2_XS", 0.45), "IQ2_XXS": ("IQ2_XXS", 0.52),
    "IQ1_M": ("IQ1_M", 0.68), "IQ1_S": ("IQ1_S", 0.73),
}
NEEDS_IMATRIX = ("IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")


def test_the_registry_lists_exactly_the_tested_types():
    from bitsmith.compiler.frontends.gguf_arch import GGUF_TYPES

    assert set(GGUF_TYPES) == {kind for kind, _ in TYPES.values()} | {"F32"}


@pytest.fixture(scope="module")
def llama_f32(tmp_path_factory):
    folder: dict = {}

    def get(shared_data):
        if "f32" not in folder:
            made = tmp_path_factory.mktemp("llama")
            peer.write_hf_dir("llama", made / "hf", shared_data)
            folder["f32"] = peer.convert(made / "hf", made / "F32.gguf")
        return folder["f32"]

    return get


@pytest.mark.parametrize("ftype", list(TYPES))
def test_every_type_dequantizes_like_llamacpp(llama_f32, shared_data, ftype, tmp_path):
    peer.peer()
    f32 = llama_f32(shared_data)
    path = tmp_path / f"{ftype}.gguf"
    if ftype in NEEDS_IMATRIX:
        peer.quantize_with_imatrix(f32, path, ftype)
    else:
        peer.quantize(f32, path, ftype, pure=True)
    kind, bound = TYPES[ftype]
    matrices = {name for name, t in peer.tensor_types(f32).items() if not name.endswith("norm.weight")}
    assert {peer.tensor_types(path)[name] for name in matrices} == {kind}
    assert Counter(load_gguf(path).source["gguf_types"])[kind] == len(matrices)

    _, reference = gguf_hf_checkpoint(f32)
    _, state = gguf_hf_checkpoint(path)
    for name, w in reference.items():
        err = float(np.sqrt(np.mean((state[name] - w) ** 2) / np.mean(w ** 2)))
        assert err < (bound if w.ndim == 2 else 1e-7), (name, err)

    ids = [int(i) for i in np.random.default_rng(5).integers(3, 1000, size=14)]
    ref, _ = llamacpp_run(path, ids, tmp_path / "logits.npy")
    assert_close_to_llamacpp(teacher_forced_logits(ours_loaded(path), ids), ref, 3e-2)
