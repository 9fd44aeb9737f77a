"""The weights of a compile: read from their files when a pass asks, new ones kept small in memory or spilled to disk."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Iterator, Mapping, MutableMapping

import numpy as np

from bitsmith.errors import BitsmithError
from bitsmith.runtime.safetensors_io import StoredTensor, Tensor

SPILL_BYTES = 1 << 20  # arrays this large or larger go to the spill directory when there is one

# Memory of a compile: a checkpoint's tensors are StoredTensors (nothing read until a pass asks, and what
# it reads is freed with the array it got); what passes write goes to one file per tensor in the spill
# directory (the artifact's staging directory), so resident memory is bounded by what the running pass
# holds at once (a layer, or a chunk of rows), not by the model.


class WeightStore(MutableMapping[str, np.ndarray]):
    """name -> weight array. `store[name]` reads a file-backed entry each time (nothing is cached);
    `store[name] = array` keeps small arrays in memory and writes large ones to the spill directory."""

    def __init__(self, weights: Mapping[str, Tensor] | None = None, spill_dir: str | Path | None = None):
        self._entries: dict[str, Tensor] = {}
        self._spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._counter = itertools.count()
        if self._spill_dir is not None:
            self._spill_dir.mkdir(parents=True, exist_ok=True)
        if isinstance(weights, WeightStore):
            self._entries.update(weights._entries)
        elif weights is not None:
            self._entries.update(weights)

    # --- the mapping
    def __getitem__(self, name: str) -> np.ndarray:
        entry = self._entries[name]
        return entry.read() if isinstance(entry, StoredTensor) else entry

    def __setitem__(self, name: str, value: Tensor) -> None:
        if not isinstance(value, StoredTensor):
            value = np.asarray(value)
            if self._spill_dir is not None and value.nbytes >= SPILL_BYTES:
                value = self._spill(value)
        self._drop(name)
        self._entries[name] = value

    def __delitem__(self, name: str) -> None:
        if name not in self._entries:
            raise KeyError(name)
        self._drop(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    # --- without reading
    def entry(self, name: str) -> Tensor:
        """The array or the StoredTensor behind `name`, unread."""
        return self._entries[name]

    def entries(self) -> dict[str, Tensor]:
        """A snapshot of every entry, unread (entries are replaced on write, never changed in place)."""
        return dict(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name].shape)

    def dtype(self, name: str) -> np.dtype:
        return np.dtype(self._entries[name].dtype)

    def nbytes(self, name: str) -> int:
        return int(self._entries[name].nbytes)

    def link(self, name: str, source: str) -> None:
        """`name` becomes another name for `source`'s entry (no bytes are read or copied)."""
        self._drop(name)
        self._entries[name] = self._entries[source]

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of a weight; for a file-backed one only those rows are read."""
        entry = self._entries[name]
        return entry.read_rows(start, stop) if isinstance(entry, StoredTensor) else entry[start:stop]

    def writer(self, name: str, shape: tuple[int, ...], dtype: np.dtype | str) -> "RowWriter":
        """A writer that takes the rows of `name` in order, a chunk at a time (`with store.writer(...) as w`)."""
        return RowWriter(self, name, tuple(shape), np.dtype(dtype))

    # --- spilling
    def _new_spill_path(self) -> Path:
        assert self._spill_dir is not None
        return self._spill_dir / f"{next(self._counter):06d}.bin"

    def _spill(self, array: np.ndarray) -> StoredTensor:
        path = self._new_spill_path()
        np.ascontiguousarray(array).tofile(path)
        return StoredTensor(path, 0, array.dtype, tuple(array.shape))

    def _drop(self, name: str) -> None:
        """Forget `name`; a spill file no other name refers to is deleted."""
        entry = self._entries.pop(name, None)
        if isinstance(entry, StoredTensor) and self._owns(entry):
            if not any(e is entry or (isinstance(e, StoredTensor) and e.path == entry.path)
                       for e in self._entries.values()):
                entry.path.unlink(missing_ok=True)

    def _owns(self, entry: StoredTensor) -> bool:
        return self._spill_dir is not None and entry.path.parent == self._spill_dir


class RowWriter:
    """Writes a weight row chunk by row chunk: into a spill file when the store spills, else into an array."""

    def __init__(self, store: WeightStore, name: str, shape: tuple[int, ...], dtype: np.dtype):
        self.store, self.name, self.shape, self.dtype = store, name, shape, dtype
        self.rows = 0
        self._array: np.ndarray | None = None
        self._file = None
        self._path: Path | None = None

    def __enter__(self) -> "RowWriter":
        if self.store._spill_dir is not None:
            self._path = self.store._new_spill_path()
            self._file = open(self._path, "wb")
        else:
            self._array = np.empty(self.shape, dtype=self.dtype)
        return self

    def write(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.shape[1:] or self.rows + rows.shape[0] > self.shape[0]:
            raise BitsmithError(f"rows {rows.shape} do not continue {self.name} {self.shape} at row {self.rows}",
                                where="weight store", fix="this is a bug in the pass writing the weight")
        if self._file is not None:
            rows.tofile(self._file)
        else:
            self._array[self.rows:self.rows + rows.shape[0]] = rows
        self.rows += rows.shape[0]

    def __exit__(self, kind, value, traceback) -> None:
        if self._file is not None:
            self._file.close()
        if kind is not None or self.rows != self.shape[0]:
            if self._path is not None:
                self._path.unlink(missing_ok=True)
        if kind is not None:
            return
        if self.rows != self.shape[0]:
            raise BitsmithError(f"{self.name}: {self.rows} of {self.shape[0]} rows written", where="weight store",
                                fix="this is a bug in the pass writing the weight")
        if self._path is not None:
            self.store[self.name] = StoredTensor(self._path, 0, self.dtype, self.shape)
        else:
            self.store[self.name] = self._array
