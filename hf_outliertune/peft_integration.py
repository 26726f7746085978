"""LoRA adapters on the quantized layers, registered with PEFT when `hf_outliertune` is imported.

`get_peft_model(model, LoraConfig(target_modules=[...]))` wraps each targeted `OutlierTuneLinear` (W8A8/W6A6)
in an `OutlierTuneLoraLinear` and each `WeightOnlyLinear` (AdaDim) in a `WeightOnlyLoraLinear`. PEFT's
custom-module registry (`LoraConfig._register_custom_module`) is per config and is not saved with an adapter,
so `register_with_peft()` adds the mapping to every `LoraConfig` at dispatch time (including the one
`PeftModel.from_pretrained` rebuilds in a fresh process) and makes `target_modules="all-linear"` include the
quantized layers.

The frozen base stays quantized and runs its own forward, whose backward passes grad_y · W_eff to the input.
The adapter reads the base's float input in the coordinates W_eff acts on, so the adapter is an exact additive
change of W_eff:
- static OutlierTune layers receive grid-domain inputs (the step Δ is folded into the norm, so |x| reaches
  qmax): the adapter reads the activation codes round(x − input_offset) / qmax (straight-through gradient),
  O(1) like the input of a float layer, which keeps the usual LoRA learning rates valid; the codes are also
  what a fused norm hands the layer at inference, and what the merged weight multiplies;
- dynamic layers (per-token, possibly Hadamard-rotated inside the layer) and weight-only layers: the float
  input as it is.

Merging adds the adapters to the dequantized weight and re-quantizes it in place, on the stored grid where
the merged values still fit, with stochastic rounding: adapter changes are mostly far below one quantization
step (round-to-nearest would erase them), and unbiased rounding keeps them on average. Lossy;
`docs/finetuning.md` has the measured cost. `unmerge` restores the stored integer tensors exactly.
"""

from __future__ import annotations

import functools
import warnings
import zlib
from typing import Any

import torch
import torch.nn as nn
from peft.tuners import tuners_utils
from peft.tuners.lora.config import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.model import LoraModel
from peft.tuners.tuners_utils import check_adapters_to_merge
from peft.utils import INCLUDE_LINEAR_LAYERS_SHORTHAND

from .adadim import expand_groups, max_code, num_groups, quantize_rtn
from .kernels.packing import pack_codes, unpack_codes
from .modules import OutlierTuneLinear
from .quant_math import qmax, round_clamp, weight_scales_absmax
from .rotation import rotate
from .weight_only_linear import WeightOnlyLinear

MERGE_WARNING = (
    "Merging a LoRA adapter into hf-outliertune quantized layers re-quantizes W + ΔW (stochastic rounding on the "
    "layer's grid): lossy, see docs/finetuning.md for the measured cost. To keep the adapter exact, serve it "
    "unmerged."
)


class QuantizedLoraLinear(LoraLinear):
    """Plain LoRA beside a frozen quantized layer; subclasses say what the adapters read and how a merge
    re-quantizes."""

    quantized_tensors: tuple[str, ...] = ()  # the base tensors a merge rewrites (restored by `unmerge`)
    input_scale: float = 1.0  # the adapters add `scaling · B A · input_scale` to W_eff

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        if config.lora_bias:
            raise ValueError(
                f"{type(self).__name__} does not support lora_bias=True; pass LoraConfig(lora_bias=False)."
            )
        if config.fan_in_fan_out:
            raise ValueError(f"{type(self).__name__} needs fan_in_fan_out=False (the base weight is (out, in)).")
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self._pre_merge_state: dict[str, torch.Tensor] = {}

    @property
    def lora_variants(self) -> dict[tuple[str, ...], None]:
        return {(): None}  # plain LoRA only: DoRA & co. need the float base weight in the forward

    def resolve_lora_variant(self, *, config: LoraConfig, **kwargs: Any) -> None:
        try:
            return super().resolve_lora_variant(config=config, **kwargs)
        except ValueError as err:
            raise ValueError(
                f"{type(self).__name__} supports plain LoRA only (no DoRA, aLoRA, VeLoRA, ... variants): {err}. "
                "Remove the variant option from the LoraConfig."
            ) from err

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        """The adapter lives on the base's device in its compute dtype (the stored weight is an integer tensor)."""
        return base_layer.weight_scale.device, self.compute_dtype()

    def compute_dtype(self) -> torch.dtype:
        """The float dtype the base layer computes in (its dtype anchor or bias; fp32 if it has neither)."""
        base = self.get_base_layer()
        for t in (getattr(base, "compute_dtype_anchor", None), base.bias):
            if t is not None:
                return t.dtype
        return torch.float32

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        """The adapters' input: the base's float input in W_eff's coordinates, times `input_scale`."""
        raise NotImplementedError

    def add_to_weight(self, delta: torch.Tensor, generator: torch.Generator) -> None:
        """Re-quantize W_eff + `delta` (fp32 `(out, in)`) into the base layer, in place."""
        raise NotImplementedError

    def effective_delta(self, adapter: str) -> torch.Tensor:
        """The fp32 change of W_eff that the adapter computes."""
        return self.get_delta_weight(adapter).float() * self.input_scale

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._check_forward_args(x, *args, **kwargs)
        adapter_names = kwargs.pop("adapter_names", None)
        if self.disable_adapters and self.merged:
            self.unmerge()
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or self.merged:
            return result
        lora_x = self.lora_input(x)
        if adapter_names is not None:  # mixed batch: row i uses adapter adapter_names[i] ("__base__": none)
            for name in sorted(set(adapter_names) & set(self.lora_A.keys())):
                rows = torch.tensor([i for i, a in enumerate(adapter_names) if a == name], device=x.device)
                result = result.index_add(0, rows, self._adapter_output(name, lora_x[rows]).to(result.dtype))
            return result
        for name in self.active_adapters:
            if name in self.lora_A:
                result = result + self._adapter_output(name, lora_x).to(result.dtype)
        return result

    def _adapter_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        x = self._cast_input_dtype(x, lora_a.weight.dtype)
        return lora_b(lora_a(self.lora_dropout[name](x))) * self.scaling[name]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the adapters to the dequantized weight and re-quantize it into the base layer (stochastic rounding)."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.lora_A]
        if not names:
            return
        base = self.get_base_layer()
        with torch.no_grad():
            delta = sum(self.effective_delta(name) for name in names)
            if safe_merge and not torch.isfinite(delta).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapters {names} seem to be broken.")
            if not self.merged:
                self._pre_merge_state = {k: getattr(base, k).detach().clone() for k in self.quantized_tensors}
            # reproducible, and independent across layers (a shared seed would align the rounding of
            # same-shaped layers, whose errors then add up coherently in the residual stream)
            seed = zlib.crc32(base.weight_scale.detach().cpu().numpy().tobytes())
            generator = torch.Generator(device=base.weight_scale.device).manual_seed(seed)
            self.add_to_weight(delta.to(base.weight_scale.device), generator)
        self.merged_adapters.extend(names)
        warnings.warn(MERGE_WARNING, UserWarning, stacklevel=2)

    def unmerge(self) -> None:
        """Restore the base layer's integer tensors as they were before the first merge (exact)."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        with torch.no_grad():
            for key, value in self._pre_merge_state.items():
                getattr(base, key).copy_(value)
        self._pre_merge_state = {}
        self.merged_adapters.clear()


class OutlierTuneLoraLinear(QuantizedLoraLinear):
    """LoRA on an `OutlierTuneLinear` (W8A8 / W6A6, static or dynamic activations)."""

    quantized_tensors = ("weight", "weight_scale")

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        base = self.get_base_layer()
        self.input_scale = 1.0 / qmax(base.act_bits) if base.act_mode == "static" else 1.0

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        base = self.get_base_layer()
        x = base.float_input(x)
        if base.act_mode != "static":
            return x
        if base.input_offset is not None:
            x = x - base.input_offset.to(x.dtype)
        # The codes the integer GEMM multiplies (gradient straight through the rounding), whether the input
        # arrives as floats (training) or as codes from a fused norm (inference): both paths and the merged
        # layer then see the same adapter input.
        codes = round_clamp(x, base.act_bits)
        return (x + (codes - x).detach()) * self.input_scale

    def add_to_weight(self, delta: torch.Tensor, generator: torch.Generator) -> None:
        """Per-row symmetric codes; a row keeps its step unless a code would round past the grid."""
        base = self.get_base_layer()
        # W_eff = W·blockdiag(H) with H symmetric and orthonormal, so applying H again gives W's change.
        delta = rotate(delta, base.hadamard_block) if base.hadamard_block > 1 else delta
        q, step = qmax(base.weight_bits), base.weight_scale.float()[:, None]
        codes = base.weight.float() + delta / step  # in steps of the stored grid
        regrid = codes.abs().amax(dim=1) > q + 0.5
        if regrid.any():
            target = base.weight.float() * step + delta
            step = torch.where(regrid[:, None], weight_scales_absmax(target, base.weight_bits)[:, None], step)
            codes = torch.where(regrid[:, None], target / step, codes)
        base.weight.copy_(stochastic_round(codes, generator).clamp(-q, q).to(torch.int8))
        base.weight_scale.copy_(step[:, 0].to(base.weight_scale.dtype))


class WeightOnlyLoraLinear(QuantizedLoraLinear):
    """LoRA on a `WeightOnlyLinear` (AdaDim W2/W3/W4/W8 groups; float activations)."""

    quantized_tensors = ("qweight", "weight_scale", "weight_zero")

    def lora_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def add_to_weight(self, delta: torch.Tensor, generator: torch.Generator) -> None:
        """Codes on each group's stored grid; a group where a code would round past the grid gets a fresh one."""
        base = self.get_base_layer()
        bits, g, layout, shape = base.bits, base.group_size, base.group_dim, tuple(delta.shape)
        top = max_code(bits)
        stored = unpack_codes(base.qweight, bits, base.in_features).float()
        step = expand_groups(base.weight_scale, g, layout, shape)
        zero = expand_groups(base.weight_zero, g, layout, shape)
        codes = stored + delta / step  # in steps of the stored grid
        regrid = _any_per_group((codes < -0.5) | (codes > top + 0.5), g, layout)
        scale, zero_point = base.weight_scale, base.weight_zero
        if regrid.any():
            target = (stored - zero) * step + delta
            fresh = quantize_rtn(target, bits, g, layout)
            scale = torch.where(regrid, fresh.scale, scale)
            zero_point = torch.where(regrid, fresh.zero, zero_point)
            fresh_codes = target / expand_groups(scale, g, layout, shape) + expand_groups(zero_point, g, layout, shape)
            codes = torch.where(expand_groups(regrid, g, layout, shape) > 0, fresh_codes, codes)
        base.qweight.copy_(pack_codes(stochastic_round(codes, generator).clamp(0, top).to(torch.uint8), bits))
        base.weight_scale.copy_(scale)
        base.weight_zero.copy_(zero_point)


def stochastic_round(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """floor(x + u), u ~ U[0, 1): unbiased (E = x), so changes far below one step survive on average; an
    integer x stays exactly as it is."""
    return torch.floor(x + torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype))


def _any_per_group(mask: torch.Tensor, group_size: int, group_dim: str) -> torch.Tensor:
    """Per-group `any` of an `(N, K)` mask, in the layout of the group parameters."""
    rows = mask if group_dim == "oc" else mask.t()
    n_groups = num_groups(rows.shape[1], group_size)
    padded = torch.nn.functional.pad(rows, (0, n_groups * group_size - rows.shape[1]))
    hit = padded.reshape(rows.shape[0], n_groups, group_size).any(dim=-1)
    return hit if group_dim == "oc" else hit.t()


LORA_LAYERS: dict[type[nn.Module], type[QuantizedLoraLinear]] = {
    OutlierTuneLinear: OutlierTuneLoraLinear,
    WeightOnlyLinear: WeightOnlyLoraLinear,
}
QUANTIZED_LAYERS: tuple[type[nn.Module], ...] = tuple(LORA_LAYERS)

_PATCH_MARK = "_hf_outliertune_patched"


def _with_quantized_layers(create_new_module):
    """`LoraModel._create_new_module`, with our layer classes added to the config's custom-module registry."""

    @functools.wraps(create_new_module)
    def wrapper(lora_config: LoraConfig, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        registered = lora_config._custom_modules or {}
        lora_config._register_custom_module({k: v for k, v in LORA_LAYERS.items() if k not in registered})
        return create_new_module(lora_config, adapter_name, target, **kwargs)

    setattr(wrapper, _PATCH_MARK, True)
    return wrapper


def _all_linear_with_quantized_layers(include_all_linear):
    """PEFT's "all-linear" resolution, extended to the quantized layers (it only knows nn.Linear and Conv1D)."""

    @functools.wraps(include_all_linear)
    def wrapper(peft_config: Any, model: nn.Module) -> Any:
        targets = getattr(peft_config, "target_modules", None)
        wants_all = isinstance(targets, str) and targets.lower() == INCLUDE_LINEAR_LAYERS_SHORTHAND
        peft_config = include_all_linear(peft_config, model)
        if wants_all:
            peft_config.target_modules = set(peft_config.target_modules) | {
                name for name, module in model.named_modules()
                if isinstance(module, QUANTIZED_LAYERS) and not name.endswith("base_layer")
            }
        return peft_config

    setattr(wrapper, _PATCH_MARK, True)
    return wrapper


def register_with_peft() -> None:
    """Make PEFT's LoRA dispatch the quantized layers to their LoRA classes; safe to call any number of times."""
    if not getattr(LoraModel._create_new_module, _PATCH_MARK, False):
        LoraModel._create_new_module = staticmethod(_with_quantized_layers(LoraModel._create_new_module))
    if not getattr(tuners_utils._maybe_include_all_linear_layers, _PATCH_MARK, False):
        tuners_utils._maybe_include_all_linear_layers = _all_linear_with_quantized_layers(
            tuners_utils._maybe_include_all_linear_layers
        )


register_with_peft()
