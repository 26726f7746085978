"""How every public kernel entry point picks its path: Triton on CUDA, the reference elsewhere; the custom op only
where it is needed."""

from __future__ import annotations

import torch

try:
    import triton
except Exception:  # ImportError, or a broken install: the references serve
    triton = None


def uses_triton(x: torch.Tensor) -> bool:
    """The Triton kernels serve CUDA tensors when triton imports; the pure-PyTorch references serve the rest."""
    return x.is_cuda and triton is not None


def through_custom_op(x: torch.Tensor, differentiable: bool = False) -> bool:
    """Call the `torch.library` custom op (opaque to torch.compile; for a `differentiable` op it also carries the
    autograd formula) while torch.compile traces or, for such ops, while a gradient flows into `x`. Otherwise the
    Triton entry point is called directly: the op's dispatch costs host time that bounds eager prefill/decode."""
    if torch.compiler.is_compiling():
        return True
    return differentiable and torch.is_grad_enabled() and x.requires_grad
