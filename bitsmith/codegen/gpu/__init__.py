"""CUDA kernels with the CPU kernels' calling conventions: definitions, GPU schedules, ahead-of-time nvcc builds."""

from bitsmith.codegen.gpu.cuda_build import build_cuda_library, fatbin_archs
from bitsmith.codegen.gpu.schedule import GPU_FAMILIES, gpu_prim_func, gpu_reference_func

__all__ = ["GPU_FAMILIES", "build_cuda_library", "fatbin_archs", "gpu_prim_func", "gpu_reference_func"]
