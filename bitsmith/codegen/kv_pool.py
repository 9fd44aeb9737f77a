"""The paged KV pool as the attention kernels store it, shared by the CPU kernel (paged_attention.py) and the
GPU kernel (gpu/paged_attention.py): its dtypes, code ranges and buffer shapes (layouts: runtime/kv_layout.py)."""

from bitsmith.runtime.kv_layout import INT4_LEVELS, pool_storage

KV_DTYPES = {"float32": "f32", "float16": "f16", "int8": "i8", "int4": "i4"}  # pool dtype -> name token
INT8_MAX = 127  # symmetric codes in [-127, 127]
INT4_MAX = INT4_LEVELS  # asymmetric codes in [0, 15]: x = min + code * step


def pool_buffers(spec) -> tuple[tuple[tuple[int, ...], str], tuple[int, ...]]:
    """((pool shape, element dtype), scales shape) of a PagedAttentionSpec's layer pool; the scales shape is
    the int8 one for layers without scales (their kernels take no scales argument)."""
    logical = (spec.num_blocks, 2, spec.block_size, spec.kv_heads, spec.head_dim)
    shape, dtype, scales = pool_storage(spec.kv_dtype, logical)
    return (shape, dtype), scales or logical[:4]
