"""CUDA kernels with the CPU kernels' calling conventions: GPU definitions and schedules (each kernel spec's
prim_func builds them for a GPU target), and the ahead-of-time nvcc build behind codegen.build."""
