"""Code generation with Apache TVM (CPU via LLVM, CUDA via nvcc)."""
