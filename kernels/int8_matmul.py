"""int8 × int8 → int32 GEMM with a fused floating-point epilogue.

    y[m, n] = (Σ_k a[m, k] · w[n, k]) · a_scale[m] · w_scale[n] + bias[n]

`a` holds activation codes `(M, K)`, `w` weight codes `(N, K)` (K-major, the nn.Linear layout),
`a_scale` is a per-token step `(M,)` or `None` (static activations whose step is folded into the
weights), `w_scale` a per-output-channel step `(N,)`. The accumulation is exact in int32; the epilogue
runs in fp32 and the result is cast to `out_dtype`.
"""

from __future__ import annotations

import torch


def _int32_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of `a @ w.T` for int8 inputs, on any device and shape."""
    m, k = a.shape
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and w.shape[0] % 8 == 0):
        return torch._int_mm(a.contiguous(), w.t())
    # |Σ a·w| ≤ 127² · K < 2^53, so a float64 product is exact as well.
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_matmul_reference(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification of the kernel, and the CPU path."""
    acc = _int32_matmul(a, w)
    y = acc.float() * w_scale.float()[None, :]
    if a_scale is not None:
        y = y * a_scale.float()[:, None]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def int8_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dispatch: the reference on CPU (and wherever no kernel applies)."""
    return int8_matmul_reference(a, w, w_scale, a_scale, bias, out_dtype)
