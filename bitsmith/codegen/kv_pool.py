"""The paged KV pool as the attention kernels store it, shared by the CPU kernel (paged_attention.py) and the
GPU kernel (gpu/paged_attention.py): its dtypes and the int8 code range."""

KV_DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8"}  # pool dtype -> name token
INT8_MAX = 127  # symmetric codes in [-127, 127]
