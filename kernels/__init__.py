"""Triton kernels, each next to the pure-PyTorch reference that specifies it (and serves as the CPU path)."""

from .act_quant import norm_quant, per_token_quant, silu_mul_per_token_quant, static_quant
from .int8_matmul import int8_matmul, int8_matmul_reference
from .lowbit_matmul import lowbit_matmul, lowbit_matmul_reference
from .packing import dequantize_packed, pack_codes, unpack_codes

__all__ = ["int8_matmul", "int8_matmul_reference", "norm_quant", "per_token_quant", "silu_mul_per_token_quant",
           "static_quant",
           "lowbit_matmul", "lowbit_matmul_reference", "pack_codes", "unpack_codes", "dequantize_packed"]
