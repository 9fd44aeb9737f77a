"""The public entry points: every family's unscheduled definition, and its GPU schedule (dlight or by hand)."""

from __future__ import annotations

from typing import Any

from bitsmith.codegen.elementwise import BiasAddSpec, BinarySpec, GeluMulSpec, SiluMulSpec, UnarySpec
from bitsmith.codegen.embedding import EmbeddingSpec, QEmbeddingSpec
from bitsmith.codegen.gemm import GemmSpec
from bitsmith.codegen.gemv import GemvSpec
from bitsmith.codegen.gpu.compute import elementwise_tensors, embedding_tensors, norm_tensors, rope_tensors
from bitsmith.codegen.gpu.matmul import matmul_reference, matmul_shape, schedule_matmul
from bitsmith.codegen.gpu.paged_attention import paged_attention_func
from bitsmith.codegen.norm_rope import AddRmsNormSpec, LayerNormSpec, RmsNormSpec, RopeSpec
from bitsmith.codegen.paged_attention import PagedAttentionSpec
from bitsmith.codegen.target import Target, resolve_target
from bitsmith.errors import BitsmithError

_TE_FAMILIES = {
    BinarySpec: elementwise_tensors, BiasAddSpec: elementwise_tensors, UnarySpec: elementwise_tensors,
    SiluMulSpec: elementwise_tensors, GeluMulSpec: elementwise_tensors,
    RmsNormSpec: norm_tensors, AddRmsNormSpec: norm_tensors, LayerNormSpec: norm_tensors,
    RopeSpec: rope_tensors, EmbeddingSpec: embedding_tensors, QEmbeddingSpec: embedding_tensors,
}
GPU_FAMILIES = (GemvSpec, GemmSpec, PagedAttentionSpec, *_TE_FAMILIES)


def gpu_reference_func(spec: Any) -> Any:
    """The unscheduled, target-independent PrimFunc of `spec` (global_symbol spec.name), with the CPU
    kernel's arguments. Paged attention: the GPU algorithm with serial loops for threads (see
    gpu/paged_attention.py). Compiled with LLVM it checks the GPU kernels' semantics on a CPU."""
    from tvm import te

    if isinstance(spec, (GemvSpec, GemmSpec)):
        return matmul_reference(spec)
    if isinstance(spec, PagedAttentionSpec):
        return paged_attention_func(spec, threads=False)
    make = _TE_FAMILIES.get(type(spec))
    if make is None:
        raise _unsupported(spec)
    return te.create_prim_func(make(spec)).with_attr("global_symbol", spec.name)


def gpu_prim_func(spec: Any, target: Target | str) -> Any:
    """The PrimFunc of `spec` scheduled for the GPU `target` (a cuda Target or its name)."""
    tgt = resolve_target(target)
    if not tgt.is_gpu:
        raise BitsmithError(f"target {tgt.name} is not a GPU", where="codegen gpu",
                            fix="use spec.prim_func(target) for CPU targets")
    if isinstance(spec, (GemvSpec, GemmSpec)):
        return schedule_matmul(matmul_reference(spec), matmul_shape(spec)).with_attr("global_symbol", spec.name)
    if isinstance(spec, PagedAttentionSpec):
        return paged_attention_func(spec, threads=True)
    if isinstance(spec, AddRmsNormSpec):  # two outputs: dlight's reduction rules refuse it
        return _schedule_add_rmsnorm(gpu_reference_func(spec), spec.dim)
    return _dlight(gpu_reference_func(spec), tgt)


def _dlight(func: Any, target: Target) -> Any:
    """dlight's default GPU rules: the norms as cross-thread reductions (one block per row), the
    elementwise, rope and embedding kernels as one thread per output element (Fallback)."""
    import tvm
    from tvm.s_tir import dlight as dl

    name = func.attrs["global_symbol"]
    rules = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
                                    dl.gpu.Fallback())
    with target.tvm_target():
        scheduled = rules(tvm.IRModule({name: func}))[name]
    if not scheduled.attrs or not scheduled.attrs.get("tirx.is_scheduled", False):
        raise BitsmithError(f"no GPU schedule applies to {name}", where="codegen gpu",
                            fix="report the kernel description; it needs a hand schedule")
    return scheduled


def _row_threads(dim: int) -> int:
    """Threads of a per-row block: dim rounded up to whole warps, at most 256 (longer rows loop)."""
    return min(256, -(-dim // 32) * 32)


def _schedule_add_rmsnorm(func: Any, dim: int) -> Any:
    """Two launches: `sum` one thread per element; the norm one block per row, its sum of squares a
    cross-thread reduction (each thread first sums its strided share of the row), then y."""
    from tvm.s_tir import Schedule

    threads = _row_threads(dim)
    sch = Schedule(func)
    for name in ("total", "den"):
        sch.compute_inline(sch.get_sblock(name))
    y = sch.get_sblock("y")
    row, col = sch.get_loops(y)
    sch.bind(row, "blockIdx.x")
    sch.bind(sch.split(col, [None, threads])[1], "threadIdx.x")
    ss = sch.get_sblock("ss")
    sch.set_scope(ss, 0, "shared")
    sch.compute_at(ss, row)
    _, k = sch.get_loops(ss)
    outer, inner = sch.split(k, [None, threads])
    sch.reorder(inner, outer)
    sch.bind(inner, "threadIdx.x")
    total = sch.get_sblock("sum")
    block, thread = sch.split(sch.fuse(*sch.get_loops(total)), [None, 256])
    sch.bind(block, "blockIdx.x")
    sch.bind(thread, "threadIdx.x")
    return sch.mod["main"]


def _unsupported(spec: Any) -> BitsmithError:
    return BitsmithError(f"{type(spec).__name__} has no GPU kernel ({getattr(spec, 'name', spec)})",
                         where="codegen gpu",
                         fix="the lowering emits GemvSpec for GPU targets instead of QGemvI8Spec and "
                             "PagedAttentionSpec instead of AttentionSpec")
