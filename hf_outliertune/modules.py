"""`OutlierTuneLinear`: the quantized linear layer (int8 storage, integer GEMM, per-channel epilogue).

Two input modes:
- ``static``: the input already lives on the integer grid because the per-channel step Δ was folded into the
  producing normalization (and into this layer's weight columns, W' = W·diag(Δ)). The runtime work is
  `round(x - offset)` and a clamp; `input_offset` (z/Δ) is present only where no norm bias could absorb
  the symmetrization shift (bias-free RMSNorm models).
- ``dynamic``: per-token absmax quantization at run time (inputs not produced by a norm), optionally after
  a block-Hadamard rotation of the input (`hadamard_block` > 1; the weight columns are rotated offline).

A static layer also accepts its input already as int8 codes: `fusion.fuse_norm_quant` makes the producing
norm emit them (one fused norm+quantize kernel instead of a float write and one re-read per reader).

The forward is differentiable w.r.t. its float input (straight-through over the activation rounding:
grad_x = grad_y · `effective_weight()`), so LoRA adapters train on top; the integer weight and the scales
never receive gradients.

Parameters carry exactly the names, shapes and dtypes stored in checkpoints, so a pre-quantized model loads
by direct assignment.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int8_matmul, per_token_quant, static_quant
from .rotation import rotate
from .storage_dtypes import KeepsStorageDtypes

ACT_MODES = ("static", "dynamic")


class OutlierTuneLinear(KeepsStorageDtypes):
    """A linear layer with int8 weight codes (int6 values for 6-bit) and integer activations."""

    storage_dtype_buffers = ("weight_scale", "input_offset")  # fp32 whatever the model's dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        act_mode: str,
        has_input_offset: bool,
        weight_bits: int,
        act_bits: int,
        hadamard_block: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode={act_mode!r} is invalid; allowed values: {list(ACT_MODES)}.")
        if has_input_offset and act_mode != "static":
            raise ValueError("input_offset only exists for static activations.")
        if hadamard_block > 1 and (act_mode != "dynamic" or in_features % hadamard_block):
            raise ValueError(f"hadamard_block={hadamard_block} needs dynamic activations and divides in_features.")
        self.in_features = in_features
        self.out_features = out_features
        self.act_mode = act_mode
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.hadamard_block = hadamard_block
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8, device=device), requires_grad=False
        )
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        offset = torch.empty(in_features, dtype=torch.float32, device=device) if has_input_offset else None
        self.register_buffer("input_offset", offset)
        # Follows `model.to(dtype)`; gives the output dtype when the input arrives as int8 codes.
        self.register_buffer("compute_dtype_anchor", torch.empty(0, dtype=dtype, device=device), persistent=False)

    @property
    def format(self) -> dict[str, object]:
        """What a checkpoint needs to rebuild this module (stored in the config's `module_formats`)."""
        return {
            "act": self.act_mode,
            "offset": self.input_offset is not None,
            "bias": self.bias is not None,
            "hadamard": self.hadamard_block,
        }

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Activation codes `(tokens, in)` and, for dynamic mode, the per-token step."""
        if x2d.dtype == torch.int8:
            if self.act_mode != "static":
                raise TypeError(f"{self.act_mode} OutlierTuneLinear got int8 input; only static layers read codes.")
            return x2d, None
        if self.act_mode == "dynamic":
            return per_token_quant(x2d.contiguous(), self.act_bits, self.hadamard_block)
        return static_quant(x2d.contiguous(), self.input_offset, self.act_bits), None

    def float_input(self, x: torch.Tensor) -> torch.Tensor:
        """The float input this layer quantizes: `x` itself, or for int8 codes from a fused norm, codes + offset."""
        if x.dtype != torch.int8:
            return x
        xf = x.to(self.compute_dtype_anchor.dtype)
        return xf + self.input_offset.to(xf.dtype) if self.input_offset is not None else xf

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _StraightThroughLinear.apply(x, self)
        return self._quantized_forward(x)

    def _quantized_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        out_dtype = self.compute_dtype_anchor.dtype if x.dtype == torch.int8 else x.dtype
        codes, a_scale = self.quantize_input(x.reshape(-1, self.in_features))
        return self.matmul_codes(codes, a_scale, out_dtype).reshape(*lead, self.out_features)

    def matmul_codes(self, codes: torch.Tensor, a_scale: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        """The layer's output `(tokens, out)` for activation codes `(tokens, in)` quantized the way
        `quantize_input` does (a fused producer hands them over directly)."""
        return int8_matmul(codes, self.weight, self.weight_scale, a_scale, self.bias, out_dtype=out_dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer applies to its (grid-domain, possibly rotated) input: codes × per-row step."""
        return self.weight.float() * self.weight_scale.float()[:, None]

    def effective_weight(self) -> torch.Tensor:
        """W_eff with y ≈ x · W_effᵀ + bias for the float input x (the Hadamard rotation included)."""
        w = self.dequantized_weight()
        return rotate(w, self.hadamard_block) if self.hadamard_block > 1 else w

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{self.weight_bits}A{self.act_bits}, act={self.act_mode}, offset={self.input_offset is not None}, "
            f"hadamard={self.hadamard_block}"
        )


class _StraightThroughLinear(torch.autograd.Function):
    """Quantized forward; backward through the dequantized weight (the rounding is treated as identity)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: OutlierTuneLinear) -> torch.Tensor:
        ctx.module = module
        return module._quantized_forward(x)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor, None]:
        w = ctx.module.effective_weight().to(grad_y.dtype)
        return grad_y @ w, None
