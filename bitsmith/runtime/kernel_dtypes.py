"""How a stored weight dtype reaches a kernel: the one convention the code generator (which declares the
kernels' buffers) and the runners (which hand them arrays) share.

bfloat16 travels as its uint16 bit pattern. numpy has no bfloat16 of its own (ml_dtypes adds one) and its DLPack
export refuses that type, so a zero-copy TVM tensor of a bf16 array cannot be made; its uint16 view can. A kernel
widens those bits to float32 with a 16-bit shift (bf16 is the top half of a float32), which every LLVM and CUDA
target does natively, so no target needs TVM's own bfloat16 support.
"""

from __future__ import annotations

import numpy as np

# stored dtype -> the dtype of the kernel buffer that carries it (every other dtype travels as itself)
KERNEL_DTYPES = {"bfloat16": "uint16"}


def kernel_dtype(dtype: str) -> str:
    """The dtype of the kernel argument that carries a weight stored as `dtype`."""
    return KERNEL_DTYPES.get(dtype, dtype)


def kernel_array(array: np.ndarray) -> np.ndarray:
    """`array` as a kernel reads it: a bf16 array as a uint16 view of the same memory (no copy), else itself."""
    carried = KERNEL_DTYPES.get(array.dtype.name)
    return array if carried is None else array.view(carried)
