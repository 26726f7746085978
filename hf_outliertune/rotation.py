"""Block-diagonal Hadamard rotations for the per-token-quantized inputs (o_proj, down_proj...).

A single input channel that is 1000x its peers forces a coarse per-token step on every other channel of
that token. Rotating the input by an orthonormal Hadamard block spreads such a channel over the whole
block; the weight is rotated the same way offline, so (x H)(W H)ᵀ = x Wᵀ exactly in real arithmetic.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .kernels.act_quant import block_hadamard as rotate  # x · blockdiag(H, ..., H), fp32

MAX_BLOCK = 2048


def hadamard_block_size(n: int, max_block: int = MAX_BLOCK) -> int:
    """Largest power of two that divides `n` (at most `max_block`); 1 means no rotation is possible."""
    block = 1
    while n % (block * 2) == 0 and block * 2 <= max_block:
        block *= 2
    return block


@lru_cache(maxsize=16)
def _hadamard_cpu(n: int) -> torch.Tensor:
    """Orthonormal Sylvester Hadamard matrix of order n (a power of two), symmetric: H = Hᵀ = H⁻¹."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).float()


def hadamard(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The matrix itself (for rotating a Hessian at quantization time; forward passes use `rotate`)."""
    return _hadamard_cpu(n).to(device)


def rotate_hessian(h: torch.Tensor, block: int) -> torch.Tensor:
    """Σ (xH)(xH)ᵀ = Hᵀ (Σ x xᵀ) H for the block-diagonal H."""
    k = h.shape[0]
    hb = hadamard(block, h.device)
    r = h.float().reshape(k // block, block, k // block, block)
    r = torch.einsum("ab,ibjc->iajc", hb, r)  # left multiply by Hᵀ (= H) per block row
    r = torch.einsum("iajc,cd->iajd", r, hb)  # right multiply by H per block column
    return r.reshape(k, k)
