"""Read/write safetensors with numpy only (bfloat16 via ml_dtypes), memory-mapped on read."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Union

import numpy as np

from bitsmith.errors import BitsmithError

# File layout:  [u64 little-endian header length N][N bytes JSON header, space-padded to 8][raw tensor bytes]
# header: {"name": {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}, "__metadata__": {str: str}}
_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64", "int32": "I32",
          "int8": "I8", "uint8": "U8", "uint32": "U32", "bool": "BOOL", "float64": "F64"}
_DTYPES = {v: k for k, v in _CODES.items()}


def numpy_dtype(name: str) -> np.dtype:
    if name == "bfloat16":
        import ml_dtypes  # heavy: ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


COPY_CHUNK = 64 << 20  # bytes per read/write when a tensor is streamed from one file into another


@dataclass(frozen=True)
class StoredTensor:
    """A tensor that lives in a file (a checkpoint, an artifact, a spill file): its bytes are read only when
    asked for, a whole tensor (`read`), some rows (`read_rows`) or streamed into another file (`copy_to`)."""

    path: Path
    offset: int  # byte offset of the first element in the file
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        """np.asarray(tensor) reads it: code written for arrays takes a StoredTensor too."""
        array = self.read()
        return array if dtype is None else array.astype(dtype)

    def read(self) -> np.ndarray:
        """A fresh in-memory array (not a map: its memory is freed with it)."""
        return self.read_rows(0, self.shape[0] if self.shape else 1).reshape(self.shape)

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) along the first axis, as a fresh array."""
        row = int(np.prod(self.shape[1:], dtype=np.int64)) if self.shape else 1
        count = (stop - start) * row
        array = np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset + start * row * self.dtype.itemsize)
        if array.size != count:
            raise BitsmithError(f"file ends inside a tensor ({array.size} of {count} elements)", where=str(self.path),
                                fix="the file is truncated; rebuild or re-download it")
        return array.reshape((stop - start, *self.shape[1:]) if self.shape else ())

    def read_into(self, out: np.ndarray) -> None:
        """Read the tensor straight into `out` (C-contiguous, nbytes equal): no temporary, no map."""
        target = memoryview(out.reshape(-1).view(np.uint8))
        if out.nbytes != self.nbytes or not out.flags.c_contiguous:
            raise BitsmithError(f"cannot read {self.nbytes} bytes into a {out.nbytes}-byte buffer", where=str(self.path),
                                fix="this is a bug in the loader")
        with open(self.path, "rb", buffering=0) as f:
            f.seek(self.offset)
            done = 0
            while done < self.nbytes:
                n = f.readinto(target[done:done + COPY_CHUNK])
                if not n:
                    raise BitsmithError("file ends inside a tensor", where=str(self.path),
                                        fix="the file is truncated; rebuild or re-download it")
                done += n

    def copy_to(self, out: Any, progress: Any = None) -> None:
        """Append this tensor's bytes to the open binary file `out`, COPY_CHUNK at a time."""
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            left = self.nbytes
            while left:
                block = f.read(min(left, COPY_CHUNK))
                if not block:
                    raise BitsmithError("file ends inside a tensor", where=str(self.path),
                                        fix="the file is truncated; rebuild or re-download it")
                out.write(block)
                left -= len(block)
                if progress is not None:
                    progress.update(len(block))


Tensor = Union[np.ndarray, StoredTensor]


def safetensors_header(tensors: Iterable[tuple[str, Any, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The bytes before the data: length + JSON header for (name, dtype, shape) laid out back to back, in order."""
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, dtype, shape in tensors:
        code = _CODES.get(str(np.dtype(dtype)))
        if code is None:
            raise BitsmithError(f"cannot store dtype {dtype} of {name!r} in safetensors")
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, Tensor]], metadata: dict[str, str] | None = None,
                      progress: Any = None) -> None:
    """Write tensors in the given order; a StoredTensor is streamed from its file (memory stays one chunk),
    `progress` (a tqdm-like object) is advanced by bytes written."""
    items = [(name, t if isinstance(t, StoredTensor) else np.ascontiguousarray(t)) for name, t in tensors]
    with open(path, "wb") as f:
        f.write(safetensors_header(((n, t.dtype, t.shape) for n, t in items), metadata))
        for _, tensor in items:
            if isinstance(tensor, StoredTensor):
                tensor.copy_to(f, progress)
                continue
            f.write(tensor.view(np.uint8).reshape(-1).data if tensor.size else b"")
            if progress is not None:
                progress.update(tensor.nbytes)


def read_safetensors_header(path: str | Path) -> tuple[dict[str, Any], int]:
    """(header, byte offset of the data section); raises a BitsmithError naming a truncated or corrupt file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise BitsmithError("file is shorter than a safetensors header", where=str(path), fix="rebuild or re-download it")
        (n,) = struct.unpack("<Q", raw)
        if n > size - 8:
            raise BitsmithError("safetensors header runs past the end of the file", where=str(path),
                                fix="the file is truncated; rebuild or re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BitsmithError(f"safetensors header is not JSON: {exc}", where=str(path), fix="rebuild it") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise BitsmithError(f"file has {size} bytes but its header needs {8 + n + end}", where=str(path),
                            fix="the file is truncated; rebuild or re-download it")
    return header, 8 + n


def _dtype_of(code: str, name: str, path: str | Path) -> np.dtype:
    if code not in _DTYPES:
        raise BitsmithError(f"tensor {name!r} has dtype {code}, which bitsmith does not read", where=str(path),
                            fix=f"convert the checkpoint to one of {sorted(_DTYPES)}")
    return numpy_dtype(_DTYPES[code])


def stored_tensors(path: str | Path) -> dict[str, StoredTensor]:
    """name -> StoredTensor of each tensor in the file; nothing but the header is read."""
    header, start = read_safetensors_header(path)
    path = Path(os.path.abspath(path))
    return {name: StoredTensor(path, start + info["data_offsets"][0], _dtype_of(info["dtype"], name, path),
                               tuple(info["shape"]))
            for name, info in header.items() if name != "__metadata__"}


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only array backed by a memory map of the file."""
    header, start = read_safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = _dtype_of(info["dtype"], name, path)
        tensors[name] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
    return tensors
