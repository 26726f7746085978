"""`OutlierTuneLinear`: the quantized linear layer (int8 storage, integer GEMM, per-channel epilogue).

Two input modes:
- ``static``: the input already lives on the integer grid because the per-channel step Δ was folded into the
  producing normalization (and into this layer's weight columns, W' = W·diag(Δ)). The runtime work is
  `round(x - offset)` and a clamp; `input_offset` (z/Δ) is present only where no norm bias could absorb
  the symmetrization shift (bias-free RMSNorm models).
- ``dynamic``: per-token absmax quantization at run time (inputs not produced by a norm), optionally after
  a block-Hadamard rotation of the input (`hadamard_block` > 1; the weight columns are rotated offline).

Parameters carry exactly the names, shapes and dtypes stored in checkpoints, so a pre-quantized model loads
by direct assignment.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .kernels import int8_matmul
from .quant_math import quantize_per_token, round_clamp
from .rotation import rotate

ACT_MODES = ("static", "dynamic")


class OutlierTuneLinear(nn.Module):
    """A linear layer with int8 weight codes (int6 values for 6-bit) and integer activations."""

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
        if self.act_mode == "dynamic":
            if self.hadamard_block > 1:
                x2d = rotate(x2d, self.hadamard_block)
            return quantize_per_token(x2d, self.act_bits)
        xs = x2d.float()
        if self.input_offset is not None:
            xs = xs - self.input_offset
        return round_clamp(xs, self.act_bits).to(torch.int8), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        codes, a_scale = self.quantize_input(x.reshape(-1, self.in_features))
        y = int8_matmul(codes, self.weight, self.weight_scale, a_scale, self.bias, out_dtype=x.dtype)
        return y.reshape(*lead, self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        """The float weight this layer applies to its (grid-domain) input: codes × per-row step."""
        return self.weight.float() * self.weight_scale[:, None]

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{self.weight_bits}A{self.act_bits}, act={self.act_mode}, offset={self.input_offset is not None}, "
            f"hadamard={self.hadamard_block}"
        )
