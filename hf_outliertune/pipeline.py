"""Layer-by-layer calibration and quantization of a float model (the quantize-on-load path).

For each decoder block, in order: the block's input comes from the already-quantized previous block;
each stage of the block (a norm and its readers, or a linear with a non-norm input) is calibrated on
what the block now computes, folded, quantized and swapped in; then the block's output is computed for
the next block. Peak memory is one block's calibration state on top of the model.

With `config.calibration_device` set (offload.py), each block visits that device for its calibration and
returns quantized, and the activations between blocks wait on CPU: peak device memory is one block.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from . import quant_math as qm
from .architectures import ArchSpec, NormGroup, decoder_layers, resolve_arch
from .calibration import (
    CalibrationError,
    ChannelStats,
    PairMoments,
    calibration_windows,
    capture_block_inputs,
    collect_stats,
    load_texts,
)
from .config import OutlierTuneConfig
from .folding import fold_into_linear, fold_into_norm, fold_into_producer, reduce_to_producer
from .modules import OutlierTuneLinear
from .offload import Offload
from .rotation import hadamard_block_size, rotate, rotate_hessian

MAX_CLIP_TOKENS = 8192


class NoQuantizableLinearError(ValueError):
    """Every linear of the model was excluded, so nothing would be quantized."""


def quantize_model(model: nn.Module, config: OutlierTuneConfig, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """Calibrate and quantize `model` in place; return the per-module formats to store in the config."""
    spec = resolve_arch(model)
    layers = decoder_layers(model, spec)
    layers_prefix = spec.layers_path
    skip = list(config.modules_to_not_convert or [])
    to_quantize = {
        f"{layers_prefix}.{i}.{name}"
        for i in range(len(layers))
        for name in spec.all_linears
        if should_convert_module(f"{layers_prefix}.{i}.{name}", skip)
    }
    if not to_quantize:
        raise NoQuantizableLinearError(
            f"No linear layer is left to quantize (modules_to_not_convert={skip}); remove some exclusions."
        )
    input_ids = calibration_windows(
        load_texts(config.dataset), tokenizer, config.num_samples, config.seq_len, config.seed
    )
    offload = Offload(config.calibration_device)  # inactive (no moves, no copies) when None
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layers, input_ids, config.calibration_batch_size, offload)
    sample_stride = max(1, math.ceil(input_ids.numel() / MAX_CLIP_TOKENS))
    formats: dict[str, dict[str, Any]] = {}
    for i, layer in enumerate(tqdm(layers, desc="OutlierTune: quantizing blocks")):
        with offload.block(layer):  # offloaded: the block visits the execution device, its inputs stream in
            block_inputs = offload.batches(inputs.hidden, inputs.layer_kwargs[i])
            for stage in spec.stages:
                names = stage.linears if isinstance(stage, NormGroup) else stage
                prefix = f"{layers_prefix}.{i}"
                selected = {n for n in names if f"{prefix}.{n}" in to_quantize}
                if isinstance(stage, NormGroup):
                    _migrate_consumers(layer, stage, spec, block_inputs, config, prefix, to_quantize)
                    _quantize_norm_group(
                        layer, stage, selected, block_inputs, config, spec, prefix, sample_stride, formats
                    )
                else:
                    for name in sorted(selected, key=names.index):
                        static = config.non_norm_activations == "static" and name in dict(spec.producers)
                        _quantize_non_norm_linear(layer, name, static, block_inputs, config, prefix, formats)
            inputs.hidden = offload.run(layer, block_inputs)
        _check_finite(inputs.hidden, f"the output of block {i}")
    model.train(was_training)
    return formats


def _quantize_norm_group(
    layer: nn.Module,
    group: NormGroup,
    selected: set[str],
    block_inputs: list,
    config: OutlierTuneConfig,
    spec: ArchSpec,
    prefix: str,
    sample_stride: int,
    formats: dict[str, dict[str, Any]],
) -> None:
    """Calibrate a norm's output, fold the per-channel step into the norm and its readers, quantize them."""
    if not selected:
        return
    norm = layer.get_submodule(group.norm)
    stats = ChannelStats(need_hessian=_needs_float_hessian(config), sample_stride=sample_stride)
    collect_stats(layer, norm, True, block_inputs, stats, f"{prefix}.{group.norm} (output)")
    linears = {n: layer.get_submodule(n) for n in group.linears}

    if config.activation_scheme == "per_token":
        moments = _input_moments(layer, norm, True, block_inputs, config, f"{prefix}.{group.norm}", None, "dynamic")
        for name in selected:
            _replace_with_quantized(
                layer, name, linears[name].weight.data.float(), stats, None, "dynamic", None, config, prefix, formats,
                moments=moments,
            )
        return

    if config.activation_scheme == "smoothquant":
        w_absmax = torch.stack([lin.weight.data.float().abs().amax(0) for lin in linears.values()]).amax(0)
        step = qm.smoothquant_scales(stats.absmax, w_absmax, config.smoothquant_alpha)
        shift = None
    else:
        shift = qm.channel_shift(stats.ch_min, stats.ch_max) if config.symmetrize else None
        z = shift if shift is not None else torch.zeros_like(stats.ch_min)
        centered_absmax = torch.maximum((stats.ch_max - z).abs(), (stats.ch_min - z).abs())
        if config.act_clip == "mse":
            step = qm.act_steps_mse(stats.sample_tensor() - z, centered_absmax, config.act_bits)
        else:
            step = qm.act_steps_max(centered_absmax, config.act_bits)

    absorbed = fold_into_norm(layer.get_submodule(group.norm), step, shift, spec.norm_weight_offset)
    act_mode = "static" if config.uses_static_activations else "dynamic"
    offset = shift / step if (shift is not None and not absorbed) else None
    moments = _input_moments(layer, norm, True, block_inputs, config, f"{prefix}.{group.norm}", offset, act_mode)
    for name, linear in linears.items():
        quantized = name in selected
        had_bias = linear.bias is not None
        folded_w = fold_into_linear(linear, step, shift if (quantized or absorbed) else None)
        if not quantized and not had_bias and linear.bias is not None:
            formats[f"{prefix}.{name}"] = {"act": "float", "bias": True}  # a reload must recreate this bias
        if quantized:
            _replace_with_quantized(
                layer, name, folded_w, stats, (shift, step), act_mode, offset, config, prefix, formats, moments=moments
            )


def _migrate_consumers(
    layer: nn.Module,
    group: NormGroup,
    spec: ArchSpec,
    block_inputs: list,
    config: OutlierTuneConfig,
    prefix: str,
    to_quantize: set[str],
) -> None:
    """Fold per-channel factors of this group's consumers (o_proj, down_proj...) into the producers' rows.

    With per-token consumers the factor is a SmoothQuant-style migration; with static consumers it is
    the activation step Δ itself. Done before the group is quantized, because the producers' rows change.
    """
    static = config.non_norm_activations == "static"
    if config.migration_alpha is None and not static:
        return
    for consumer_name, producer_name in spec.producers:
        if producer_name not in group.linears or f"{prefix}.{consumer_name}" not in to_quantize:
            continue
        consumer = layer.get_submodule(consumer_name)
        producer = layer.get_submodule(producer_name)
        stats = ChannelStats(need_hessian=False, sample_stride=1 << 30)
        collect_stats(layer, consumer, False, block_inputs, stats, f"{prefix}.{consumer_name} (input)")
        n_rep = consumer.in_features // producer.out_features
        head_dim = getattr(layer.get_submodule(consumer_name.rsplit(".", 1)[0]), "head_dim", 1)
        act = reduce_to_producer(stats.absmax, n_rep, head_dim)
        if static:
            scale = qm.act_steps_max(act, config.act_bits)
        else:
            wmax = reduce_to_producer(consumer.weight.data.float().abs().amax(0), n_rep, head_dim)
            scale = qm.smoothquant_scales(act, wmax, config.migration_alpha)
        fold_into_producer(producer, consumer, scale, n_rep, head_dim)


def _quantize_non_norm_linear(
    layer: nn.Module,
    name: str,
    static: bool,
    block_inputs: list,
    config: OutlierTuneConfig,
    prefix: str,
    formats: dict[str, dict[str, Any]],
) -> None:
    """Quantize a linear whose input is not a norm output: per-token dynamic activations (optionally
    rotated), or static ones when its step was folded into its producer by `_migrate_consumers`."""
    linear = layer.get_submodule(name)
    act_mode = "static" if static else "dynamic"
    block = hadamard_block_size(linear.in_features) if (config.rotate_dynamic and not static) else 1
    where = f"{prefix}.{name}"
    moments = _input_moments(layer, linear, False, block_inputs, config, where, None, act_mode, block)
    stats = ChannelStats(need_hessian=_needs_float_hessian(config), sample_stride=1 << 30)
    if moments is None:
        collect_stats(layer, linear, False, block_inputs, stats, f"{where} (input)")
    weight = linear.weight.data.float()
    if block > 1:
        weight = rotate(weight, block)  # W·H: the layer sees x·H at run time
        stats.xtx = rotate_hessian(stats.xtx, block) if stats.xtx is not None else None
    _replace_with_quantized(layer, name, weight, stats, None, act_mode, None, config, prefix, formats, block, moments)


def _replace_with_quantized(
    layer: nn.Module,
    name: str,
    weight: torch.Tensor,
    stats: ChannelStats,
    shift_step: tuple[torch.Tensor | None, torch.Tensor] | None,
    act_mode: str,
    offset: torch.Tensor | None,
    config: OutlierTuneConfig,
    prefix: str,
    formats: dict[str, dict[str, Any]],
    hadamard_block: int = 1,
    moments: PairMoments | None = None,
) -> None:
    """Quantize `weight` (already folded/rotated) per output channel and swap in an `OutlierTuneLinear`."""
    linear = layer.get_submodule(name)
    bits = config.weight_bits
    if moments is not None:
        weight = qm.least_squares_weight(weight, moments.cross, moments.hessian, config.gptq_damp)
    if config.weight_algorithm == "absmax":
        scale = qm.weight_scales_absmax(weight, bits)
    else:
        scale = qm.weight_scales_mse(weight, bits)
    if config.weight_algorithm == "gptq":
        hessian = moments.hessian.float() if moments is not None else _hessian_of_folded_input(stats, shift_step)
        codes = qm.gptq_quantize(weight, hessian, scale, bits, config.gptq_damp)
    else:
        codes = qm.quantize_weight(weight, scale, bits)
    quantized = OutlierTuneLinear(
        linear.in_features,
        linear.out_features,
        bias=linear.bias is not None,
        act_mode=act_mode,
        has_input_offset=offset is not None,
        weight_bits=bits,
        act_bits=config.act_bits,
        hadamard_block=hadamard_block,
        dtype=linear.weight.dtype,
        device=linear.weight.device,
    )
    with torch.no_grad():
        quantized.weight.copy_(codes)
        quantized.weight_scale.copy_(scale)
        if linear.bias is not None:
            quantized.bias.copy_(linear.bias.data)
        if offset is not None:
            quantized.input_offset.copy_(offset)
    layer.set_submodule(name, quantized)
    formats[f"{prefix}.{name}"] = quantized.format


def _needs_float_hessian(config: OutlierTuneConfig) -> bool:
    """GPTQ on float inputs needs Σ x xᵀ; GPTQ on quantized inputs collects its own moments instead."""
    return config.weight_algorithm == "gptq" and not config.gptq_quantized_inputs


def _input_moments(
    layer: nn.Module,
    watched: nn.Module,
    watch_output: bool,
    block_inputs: list,
    config: OutlierTuneConfig,
    where: str,
    offset: torch.Tensor | None,
    act_mode: str,
    hadamard_block: int = 1,
) -> PairMoments | None:
    """Σ x qᵀ and Σ q qᵀ of the input the quantized layer will see (x) and the values it will multiply (q),
    for GPTQ on quantized inputs; None when that option is off."""
    if config.weight_algorithm != "gptq" or _needs_float_hessian(config):
        return None
    bits = config.act_bits

    def quantizer(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = rotate(y, hadamard_block) if hadamard_block > 1 else y
        if act_mode == "static":
            x = x - offset if offset is not None else x
            return x, qm.round_clamp(x, bits)
        codes, step = qm.quantize_per_token(x, bits)
        return x, codes.float() * step[:, None]

    moments = PairMoments(quantizer)
    collect_stats(layer, watched, watch_output, block_inputs, moments, f"{where} ({'output' if watch_output else 'input'})")
    return moments


def _hessian_of_folded_input(
    stats: ChannelStats, shift_step: tuple[torch.Tensor | None, torch.Tensor] | None
) -> torch.Tensor:
    """Σ x̃ x̃ᵀ of the input the quantized layer actually sees: x̃ = (x - z) / Δ for folded layers."""
    if shift_step is None:
        return stats.xtx.float()
    shift, step = shift_step
    z = shift if shift is not None else torch.zeros_like(step)
    h = qm.centered_second_moment(stats.xtx, stats.x_sum, stats.count, z)
    inv = 1.0 / step.float()
    return h * inv[:, None] * inv[None, :]


def _check_finite(tensors: list[torch.Tensor], where: str) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise CalibrationError(
                f"NaN/inf activations in {where} during calibration; load the model with dtype=torch.float32 "
                "or check its weights."
            )
