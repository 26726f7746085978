"""Fuse activation quantizers into the kernels that produce their inputs (inference only).

- Norms. After OutlierTune folding, a norm's output is already the grid-domain input of every linear reading
  it (q/k/v after `input_layernorm`, gate/up after `post_attention_layernorm`): each reader only rounds and
  clamps it. Unfused, the norm writes a bf16 tensor that each reader reads back and quantizes. Fused, the
  norm computes its statistics, scales, shifts, rounds and writes int8 codes in one kernel, and the readers
  consume the codes directly.
- Gated MLPs (SiLU: Llama, Mistral, Qwen). Unfused, silu(gate) · up is written in the model dtype (two
  elementwise passes in eager mode) and the dynamic `down_proj` reads it back to rotate and quantize it.
  Fused, one kernel reads gate and up, forms the product in fp32 and emits down_proj's codes and steps.

A fused forward replaces the module instance's `forward` (the pattern accelerate's hooks use), so module
names, parameters and checkpoints are unchanged. With autograd enabled (training) it falls back to the
original float forward, so gradients reach the norm and LoRA layers see float inputs; a fused MLP whose
down_proj has since been wrapped (a LoRA adapter) also takes the original forward.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
import torch.nn as nn

from .architectures import ARCHITECTURES, decoder_layers
from .kernels import norm_quant, silu_mul_per_token_quant
from .modules import OutlierTuneLinear

_GATED_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class _Fusion:
    """What the fused forward needs (a plain object, so the reader is not registered as a submodule)."""

    original_forward: types.MethodType  # the norm's own float forward (training path)
    kind: str
    eps: float
    weight_offset: float
    reader: OutlierTuneLinear


def _norm_kind_and_eps(norm: nn.Module) -> tuple[str, float] | None:
    """("layer", eps) for nn.LayerNorm, ("rms", eps) for the HF RMSNorm variants, None if unrecognised."""
    if isinstance(norm, nn.LayerNorm):
        return ("layer", norm.eps) if norm.elementwise_affine else None
    weight = getattr(norm, "weight", None)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    if "RMSNorm" in type(norm).__name__ and isinstance(weight, torch.Tensor) and isinstance(eps, float):
        return "rms", eps
    return None


def _fused_forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    fusion: _Fusion = self._outliertune_fusion
    if torch.is_grad_enabled():
        return fusion.original_forward(hidden_states)
    k = hidden_states.shape[-1]
    codes = norm_quant(
        hidden_states.reshape(-1, k).contiguous(),
        self.weight,
        getattr(self, "bias", None),
        fusion.eps,
        fusion.kind,
        fusion.weight_offset,
        fusion.reader.input_offset,
        fusion.reader.act_bits,
    )
    return codes.reshape(hidden_states.shape)


def _shared_offset(readers: list[OutlierTuneLinear]) -> bool:
    """True when every reader quantizes the same way (same bits, same or no input offset)."""
    first = readers[0]
    for r in readers[1:]:
        if r.act_bits != first.act_bits or (r.input_offset is None) != (first.input_offset is None):
            return False
        if r.input_offset is not None and not torch.equal(r.input_offset, first.input_offset):
            return False
    return True


@dataclass
class _MlpFusion:
    """What the fused gated-MLP forward needs (a plain object: no submodule is registered)."""

    original_forward: types.MethodType


def _fused_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    fusion: _MlpFusion = self._outliertune_fusion
    down = self.down_proj
    if torch.is_grad_enabled() or type(down) is not OutlierTuneLinear:
        return fusion.original_forward(x)
    gate, up = self.gate_proj(x), self.up_proj(x)
    width = gate.shape[-1]
    codes, steps = silu_mul_per_token_quant(
        gate.reshape(-1, width), up.reshape(-1, width), down.act_bits, down.hadamard_block)
    return down.matmul_codes(codes, steps, gate.dtype).reshape(*gate.shape[:-1], down.out_features)


def _is_silu(module: nn.Module | None) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def fuse_activation_quant(model: nn.Module) -> int:
    """Fuse every norm with its static readers' quantizer and every SiLU-gated MLP with its dynamic down_proj's
    quantizer; return how many modules were fused."""
    return fuse_norm_quant(model) + fuse_gated_mlp_quant(model)


def fuse_gated_mlp_quant(model: nn.Module) -> int:
    """Fuse silu(gate) · up into the dynamic down_proj's quantizer in each block that has one; return how many."""
    spec = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    if spec is None or not set(_GATED_MLP) <= set(spec.all_linears):
        return 0
    fused = 0
    for layer in decoder_layers(model, spec):
        mlp = layer.get_submodule("mlp")
        down = mlp.get_submodule("down_proj")
        if type(down) is not OutlierTuneLinear or down.act_mode != "dynamic" or not _is_silu(
                getattr(mlp, "act_fn", None)) or hasattr(mlp, "_outliertune_fusion"):
            continue
        mlp._outliertune_fusion = _MlpFusion(mlp.forward)
        mlp.forward = types.MethodType(_fused_mlp_forward, mlp)
        fused += 1
    return fused


def fuse_norm_quant(model: nn.Module) -> int:
    """Fuse every norm whose readers are all static `OutlierTuneLinear`s; return how many were fused."""
    spec = ARCHITECTURES.get(getattr(getattr(model, "config", None), "model_type", None))
    if spec is None:
        return 0
    fused = 0
    for layer in decoder_layers(model, spec):
        for group in spec.norm_groups:
            norm = layer.get_submodule(group.norm)
            readers = [layer.get_submodule(name) for name in group.linears]
            if not all(isinstance(r, OutlierTuneLinear) and r.act_mode == "static" for r in readers):
                continue  # a reader kept in float needs the float norm output
            kind_eps = _norm_kind_and_eps(norm)
            if kind_eps is None or not _shared_offset(readers) or hasattr(norm, "_outliertune_fusion"):
                continue
            norm._outliertune_fusion = _Fusion(norm.forward, *kind_eps, spec.norm_weight_offset, readers[0])
            norm.forward = types.MethodType(_fused_forward, norm)
            fused += 1
    return fused


def unfuse_activation_quant(model: nn.Module) -> int:
    """Restore the original forward of every fused norm and MLP; return how many were restored."""
    restored = 0
    for module in model.modules():
        fusion = module.__dict__.pop("_outliertune_fusion", None)
        if fusion is not None:
            module.__dict__.pop("forward", None)  # back to the class's forward
            restored += 1
    return restored
