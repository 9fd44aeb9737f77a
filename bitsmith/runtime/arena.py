"""Aligned host memory for kernels: TVM tensors need 64-byte alignment; weights want 2 MiB pages."""

from __future__ import annotations

import mmap

import numpy as np

ALIGN = 64
HUGE_PAGE = 2 << 20


def aligned_bytes(nbytes: int, huge_pages: bool = False) -> np.ndarray:
    """A zeroed uint8 array of `nbytes` starting on a 64-byte (huge_pages: 2 MiB) boundary.

    huge_pages maps anonymous memory and asks for transparent huge pages before the first touch:
    fewer TLB misses make weight reads measurably faster (see cpu-performance-notes.md in the shared
    docs). Where madvise is unavailable it silently uses ordinary pages.
    """
    nbytes = max(int(nbytes), 1)
    if huge_pages:
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        region = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                region.madvise(mmap.MADV_HUGEPAGE)
            except OSError:  # THP disabled: ordinary pages still work
                pass
        return np.frombuffer(region, dtype=np.uint8, count=nbytes)
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]


def view(arena: np.ndarray, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
    """A typed, writable view of `arena` at byte `offset`."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    return arena[offset:offset + count * dt.itemsize].view(dt).reshape(shape)


def round_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align
