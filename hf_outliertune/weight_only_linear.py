"""`WeightOnlyLinear`: a linear layer with packed 2/3/4/8-bit grouped weights and floating-point activations.

Storage (what checkpoints hold, see docs/format.md): `qweight` int32 `(N, bits·ceil(K/32))` packed codes,
`weight_scale` / `weight_zero` fp16 per group in the layout of `group_dim` ("oc": `(N, ceil(K/g))`, "ic":
`(ceil(N/g), K)`), optional `bias` in the model dtype. The forward multiplies by `(q − zero)·scale` through the
fused low-bit kernel (Triton on CUDA, the pure-PyTorch reference elsewhere); both are differentiable with
respect to the input (the CUDA op registers dL/dx = dL/dy · W), which is what PEFT adapters need.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .adadim import GroupQuantized
from .kernels.lowbit_matmul import lowbit_matmul
from .kernels.packing import dequantize_packed, group_params_shape, pack_codes, words_per_row
from .storage_dtypes import KeepsStorageDtypes

WEIGHT_ONLY_ACT = "none"  # the `module_formats` "act" of a WeightOnlyLinear: activations are not quantized


def register_packed_weight(module: nn.Module, rows: int, cols: int, bits: int, group_size: int, group_dim: str,
                           device: torch.device | str | None) -> None:
    """Give `module` the packed storage of a `(rows, cols)` weight: `qweight` (int32 codes), `weight_scale` and
    `weight_zero` (fp16, in the layout of `group_dim`), as checkpoints hold them."""
    module.qweight = nn.Parameter(torch.zeros(rows, words_per_row(bits, cols), dtype=torch.int32, device=device),
                                  requires_grad=False)
    params = group_params_shape(rows, cols, group_size, group_dim)
    module.register_buffer("weight_scale", torch.ones(params, dtype=torch.float16, device=device))
    module.register_buffer("weight_zero", torch.zeros(params, dtype=torch.float16, device=device))


@torch.no_grad()
def load_packed_weight(module: nn.Module, quantized: GroupQuantized) -> None:
    """Pack `quantized`'s codes into `module.qweight` and copy its group scales and zeros."""
    module.qweight.copy_(pack_codes(quantized.codes, quantized.bits))
    module.weight_scale.copy_(quantized.scale)
    module.weight_zero.copy_(quantized.zero)


class WeightOnlyLinear(KeepsStorageDtypes):
    """A frozen linear layer whose weight is stored as grouped low-bit codes with fp16 scales and zero points."""

    storage_dtype_buffers = ("weight_scale", "weight_zero")  # fp16 whatever the model's dtype

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        bits: int,
        group_size: int,
        group_dim: str,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if group_dim not in ("oc", "ic"):
            raise ValueError(f"group_dim={group_dim!r} is invalid for a layer; allowed values: ['oc', 'ic'].")
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.group_size = group_size
        self.group_dim = group_dim
        register_packed_weight(self, out_features, in_features, bits, group_size, group_dim, device)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None

    @classmethod
    def from_quantized(cls, quantized: GroupQuantized, bias: torch.Tensor | None, dtype: torch.dtype) -> "WeightOnlyLinear":
        """The layer storing `quantized` (codes `(N, K)` with their group parameters) and a float `bias`."""
        n, k = quantized.codes.shape
        layer = cls(k, n, bias is not None, quantized.bits, quantized.group_size, quantized.group_dim, dtype,
                    quantized.codes.device)
        load_packed_weight(layer, quantized)
        if bias is not None:
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @property
    def format(self) -> dict[str, object]:
        """What a checkpoint needs to rebuild this module (stored in the config's `module_formats`)."""
        return {"act": WEIGHT_ONLY_ACT, "bits": self.bits, "group_size": self.group_size, "group_dim": self.group_dim,
                "bias": self.bias is not None}

    def effective_weight(self) -> torch.Tensor:
        """The fp32 weight `(out, in)` this layer applies: `(q − zero)·scale`."""
        return dequantize_packed(self.qweight, self.weight_scale, self.weight_zero, self.bits, self.group_size,
                                 self.group_dim, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        y = lowbit_matmul(x.reshape(-1, self.in_features), self.qweight, self.weight_scale, self.weight_zero,
                          self.bits, self.group_size, self.group_dim, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"W{self.bits} g{self.group_size} per-{self.group_dim.upper()}"
        )
