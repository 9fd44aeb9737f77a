"""Our numpy safetensors reader/writer agrees with the safetensors library, bf16 included."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import read_safetensors, write_safetensors


def test_round_trip_and_library_agreement(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(np.float16),
        "c": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
        "d": np.arange(6, dtype=np.int64).reshape(2, 3),
        "e": np.zeros((0, 4), np.float32),
    }
    path = tmp_path / "w.safetensors"
    write_safetensors(path, tensors.items())
    back = read_safetensors(path)
    for name, array in tensors.items():
        assert back[name].dtype == array.dtype and back[name].shape == array.shape
        np.testing.assert_array_equal(back[name].view(np.uint8), array.view(np.uint8))
    theirs = load_file(str(path))
    assert theirs["c"].dtype == torch.bfloat16
    np.testing.assert_array_equal(theirs["c"].float().numpy(), tensors["c"].astype(np.float32))
    save_file({"x": torch.tensor([1.5, -2.0], dtype=torch.bfloat16)}, str(tmp_path / "t.safetensors"))
    assert read_safetensors(tmp_path / "t.safetensors")["x"].astype(np.float32).tolist() == [1.5, -2.0]


def test_truncated_file_is_named(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors(path, [("a", np.ones((64, 64), np.float32))])
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(BitsmithError, match=r"w.safetensors.*truncated"):
        read_safetensors(path)
