"""Integer GEMM kernels, each next to the pure-PyTorch reference that specifies it."""

from .int8_matmul import int8_matmul, int8_matmul_reference

__all__ = ["int8_matmul", "int8_matmul_reference"]
