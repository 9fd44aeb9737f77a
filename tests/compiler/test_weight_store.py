"""The weight store: file-backed entries read on demand, spilling, row writers, links; streamed safetensors."""

from __future__ import annotations

import numpy as np
import pytest

from bitsmith.compiler.weight_store import SPILL_BYTES, WeightStore
from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import StoredTensor, read_safetensors, stored_tensors, write_safetensors


def test_stored_tensors_read_whole_rows_and_stream(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"a": rng.standard_normal((7, 5)).astype(np.float32), "b": np.arange(12, dtype=np.int32).reshape(3, 4)}
    write_safetensors(tmp_path / "x.safetensors", arrays.items())
    stored = stored_tensors(tmp_path / "x.safetensors")
    assert stored["a"].shape == (7, 5) and stored["a"].nbytes == 140 and stored["b"].dtype == np.int32
    np.testing.assert_array_equal(stored["a"].read(), arrays["a"])
    np.testing.assert_array_equal(stored["a"].read_rows(2, 6), arrays["a"][2:6])
    # a StoredTensor is streamed into another file, bit-exact, mixed with in-memory arrays
    write_safetensors(tmp_path / "y.safetensors", [("b", stored["b"]), ("c", arrays["a"] * 2), ("a", stored["a"])])
    back = read_safetensors(tmp_path / "y.safetensors")
    np.testing.assert_array_equal(back["a"], arrays["a"])
    np.testing.assert_array_equal(back["b"], arrays["b"])
    np.testing.assert_array_equal(back["c"], arrays["a"] * 2)


def test_truncated_file_is_named(tmp_path):
    tensor = StoredTensor(tmp_path / "t.bin", 0, np.dtype(np.float32), (4, 4))
    np.zeros(10, np.float32).tofile(tensor.path)
    with pytest.raises(BitsmithError, match="truncated"):
        tensor.read()


def test_store_spills_large_arrays_and_deletes_their_files(tmp_path):
    store = WeightStore({"small": np.ones(4, np.float32)}, spill_dir=tmp_path / "spill")
    big = np.arange(SPILL_BYTES // 4 + 1, dtype=np.float32).reshape(-1, 1)
    store["big"] = big
    entry = store.entry("big")
    assert isinstance(entry, StoredTensor) and entry.path.exists()
    assert isinstance(store.entry("small"), np.ndarray)
    np.testing.assert_array_equal(store["big"], big)
    np.testing.assert_array_equal(store.read_rows("big", 3, 5), big[3:5])
    assert store.shape("big") == big.shape and store.nbytes("big") == big.nbytes
    store.link("alias", "big")
    del store["big"]
    assert entry.path.exists()  # "alias" still refers to it
    del store["alias"]
    assert not entry.path.exists() and set(store) == {"small"}


@pytest.mark.parametrize("spill", [True, False])
def test_row_writer(tmp_path, spill):
    store = WeightStore(spill_dir=tmp_path / "s" if spill else None)
    with store.writer("w", (5, 3), np.float16) as w:
        w.write(np.ones((2, 3)))
        w.write(np.zeros((3, 3)))
    np.testing.assert_array_equal(store["w"], np.r_[np.ones((2, 3)), np.zeros((3, 3))].astype(np.float16))
    with pytest.raises(BitsmithError, match="2 of 5 rows written"):
        with store.writer("v", (5, 3), np.float16) as w:
            w.write(np.ones((2, 3)))
    assert "v" not in store
    if spill:
        assert len(list((tmp_path / "s").iterdir())) == 1  # the failed writer left no file behind
