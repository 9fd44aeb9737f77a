"""Read/write safetensors with numpy only (bfloat16 via ml_dtypes), memory-mapped on read."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Iterable

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


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, np.ndarray]], metadata: dict[str, str] | None = None,
                      progress: Any = None) -> None:
    """Write tensors in the given order; `progress` (a tqdm-like object) is advanced by bytes written."""
    items = [(name, np.ascontiguousarray(array)) for name, array in tensors]
    header: dict[str, Any] = {"__metadata__": metadata or {}}
    offset = 0
    for name, array in items:
        code = _CODES.get(str(array.dtype))
        if code is None:
            raise BitsmithError(f"cannot store dtype {array.dtype} of {name!r} in safetensors")
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in items:
            f.write(array.view(np.uint8).reshape(-1).data if array.size else b"")
            if progress is not None:
                progress.update(array.nbytes)


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


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """name -> read-only array backed by a memory map of the file."""
    header, start = read_safetensors_header(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        dtype = numpy_dtype(_DTYPES[info["dtype"]])
        tensors[name] = data[start + begin:start + end].view(dtype).reshape(info["shape"])
    return tensors
