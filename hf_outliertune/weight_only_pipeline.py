"""Block-by-block AdaDim weight-only quantization of a float model (the quantize-on-load path for act_bits=None).

For each decoder block, in order: the block's input comes from the already-quantized previous block; each
stage of the block (q/k/v, o_proj, gate/up, down_proj) is calibrated on what the partly-quantized block now
computes. Per linear, Σ x xᵀ of its input feeds GPTQ and the layer-output criterion.

With ``group_dim="adaptive"`` both layouts are quantized with the configured algorithm (RTN or GPTQ) and the
one whose output is closer to the float output on the calibration data is kept. Following the official AdaDim
code, the output measured is the attention module's for q/k/v and the MLP module's for gate/up (so a
candidate's error is judged after softmax and gating, and with the block's earlier choices in place), and
the linear's own output for o_proj/down_proj, whose output is the module's output anyway. Module outputs are
measured on at most `CRITERION_MAX_TOKENS` calibration tokens; own outputs exactly, on all of them, through
trace(Δ H Δᵀ). Unlike the paper, GPTQ-AdaDim compares the two GPTQ results rather than the two RTN ones:
the choice is made on the weights that will actually be stored. The choice is recorded per layer in
`module_formats`, so a reload needs no calibration. Peak extra memory is one block's calibration state.
With `config.calibration_device` set (offload.py), each block is calibrated and quantized on that device and
returns quantized; the activations between blocks wait on CPU.

Each candidate's group scales and zeros are then refitted to its codes for the least output error on the
calibration data (`adadim.refit_group_params`, `config.refit_rounds` rounds, alternating with re-choosing the
codes), before the layouts are compared.

RTN with a fixed layout, min-max groups and no refit uses no data at all: each linear is rounded directly.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
from tqdm.auto import tqdm
from transformers.quantizers.quantizers_utils import should_convert_module

from . import adadim
from .architectures import NormGroup, decoder_layers, resolve_arch
from .calibration import CalibrationError, ChannelStats, calibration_windows, capture_block_inputs, collect_stats
from .calibration import load_texts, run_block
from .config import OutlierTuneConfig
from .offload import Offload
from .pipeline import NoQuantizableLinearError
from .weight_only_linear import WeightOnlyLinear

CRITERION_MAX_TOKENS = 8192


class _Stop(Exception):
    """Raised by a hook once the module call it records is captured."""


def quantize_weight_only(model: nn.Module, config: OutlierTuneConfig, tokenizer: Any) -> dict[str, dict[str, Any]]:
    """Calibrate and quantize `model`'s decoder linears in place; return the per-module formats for the config."""
    spec = resolve_arch(model)
    layers = decoder_layers(model, spec)
    skip = list(config.modules_to_not_convert or [])
    prefixes = [f"{spec.layers_path}.{i}" for i in range(len(layers))]
    to_quantize = [f"{p}.{n}" for p in prefixes for n in spec.all_linears if should_convert_module(f"{p}.{n}", skip)]
    if not to_quantize:
        raise NoQuantizableLinearError(
            f"No linear layer is left to quantize (modules_to_not_convert={skip}); remove some exclusions."
        )
    formats: dict[str, dict[str, Any]] = {}
    offload = Offload(config.calibration_device)  # inactive (no moves, no copies) when None
    if not config.needs_calibration:
        with tqdm(total=len(to_quantize), desc="AdaDim RTN: quantizing") as bar:
            for prefix, layer in zip(prefixes, layers):
                with offload.block(layer):
                    for name in [n for n in spec.all_linears if f"{prefix}.{n}" in to_quantize]:
                        weight = layer.get_submodule(name).weight.data
                        _swap(layer, name, _quantize(weight, None, 0, config.group_dim, config), formats, prefix)
                        bar.update()
        return formats
    input_ids = calibration_windows(
        load_texts(config.dataset), tokenizer, config.num_samples, config.seq_len, config.seed
    )
    was_training = model.training
    model.eval()
    inputs = capture_block_inputs(model, layers, input_ids, config.calibration_batch_size, offload)
    criterion_batches = max(1, math.ceil(CRITERION_MAX_TOKENS / (config.calibration_batch_size * config.seq_len)))
    for i, layer in enumerate(tqdm(layers, desc=f"AdaDim W{config.weight_bits}: quantizing blocks")):
        with offload.block(layer):  # offloaded: the block visits the execution device, its inputs stream in
            block_inputs = offload.batches(inputs.hidden, inputs.layer_kwargs[i])
            chosen: dict[str, tuple[adadim.GroupQuantized, dict[str, Any] | None]] = {}
            for stage in spec.stages:
                names = stage.linears if isinstance(stage, NormGroup) else stage
                selected = [n for n in names if f"{prefixes[i]}.{n}" in to_quantize]
                if selected:
                    module = _criterion_module(selected) if isinstance(stage, NormGroup) else None
                    chosen.update(_quantize_stage(layer, selected, module, block_inputs,
                                                  block_inputs[:criterion_batches], config, prefixes[i]))
            inputs.hidden = offload.run(layer, block_inputs)
            if not all(torch.isfinite(h).all() for h in inputs.hidden):
                raise CalibrationError(
                    f"NaN/inf activations in the output of block {i} during calibration; load the model with "
                    "dtype=torch.float32 or check its weights."
                )
            for name, (quantized, criterion) in chosen.items():
                _swap(layer, name, quantized, formats, prefixes[i])
                if criterion is not None:
                    formats[f"{prefixes[i]}.{name}"]["criterion"] = criterion
    model.train(was_training)
    return formats


def _quantize_stage(
    layer: nn.Module,
    names: list[str],
    module_name: str | None,
    block_inputs: list,
    criterion_inputs: list,
    config: OutlierTuneConfig,
    prefix: str,
) -> dict[str, tuple[adadim.GroupQuantized, dict[str, Any] | None]]:
    """Quantize linears that read the same input (q/k/v, gate/up, or one o_proj/down_proj), in order; return
    each one's chosen quantization and, when adaptive, the criterion values.

    `module_name` is the module whose output judges the layouts (None: each linear's own output). Until the
    block is done, a quantized linear stays an `nn.Linear` holding its dequantized weight: the same product
    (up to float rounding) without unpacking codes at every calibration batch."""
    stats = ChannelStats(need_hessian=True, sample_stride=1 << 30)
    collect_stats(layer, layer.get_submodule(names[0]), False, block_inputs, stats, f"{prefix}.{names[0]} (input)")
    hessian = stats.xtx.float()
    adaptive = config.group_dim == "adaptive"
    calls, reference = [], []
    if adaptive and module_name is not None:
        module = layer.get_submodule(module_name)
        calls = _capture_calls(layer, module, criterion_inputs)
        reference = _module_outputs(module, calls)
    result = {}
    for name in names:
        linear = layer.get_submodule(name)
        layouts = adadim.GROUP_LAYOUTS if adaptive else (config.group_dim,)
        candidates = {dim: _quantize(linear.weight.data, hessian, stats.count, dim, config) for dim in layouts}
        errors: dict[str, float] = {}
        if adaptive:
            for dim, q in candidates.items():
                if module_name is None:
                    delta = q.dequantize() - linear.weight.data.float()
                    errors[dim] = adadim.output_error(delta, hessian) / (stats.count * linear.out_features)
                else:
                    errors[dim] = _module_error(linear, q, layer.get_submodule(module_name), calls, reference)
        chosen = candidates[adadim.pick_layout(errors) if adaptive else config.group_dim]
        linear.weight.data = chosen.dequantize().to(linear.weight.dtype)
        criterion = {"output": f"{module_name} module" if module_name else "layer",
                     **{dim: float(f"{err:.6g}") for dim, err in errors.items()}} if adaptive else None
        result[name] = (chosen, criterion)
    return result


def _swap(
    parent: nn.Module, name: str, quantized: adadim.GroupQuantized, formats: dict[str, dict[str, Any]], prefix: str = ""
) -> None:
    """Replace the linear `parent.name` by a `WeightOnlyLinear` holding `quantized`; record its format."""
    linear = parent.get_submodule(name)
    bias = linear.bias.data if linear.bias is not None else None
    module = WeightOnlyLinear.from_quantized(quantized, bias, linear.weight.dtype)
    parent.set_submodule(name, module)
    formats[f"{prefix}.{name}" if prefix else name] = dict(module.format)


def _quantize(
    weight: torch.Tensor, hessian: torch.Tensor | None, count: int, group_dim: str, config: OutlierTuneConfig
) -> adadim.GroupQuantized:
    """One candidate: RTN or GPTQ of `weight` in layout `group_dim` with the config's bits, groups, clip and
    refit rounds (`hessian` = Σ x xᵀ over `count` calibration tokens; None for data-free RTN)."""
    return adadim.quantize_weight(
        weight, hessian, count, config.weight_bits, config.group_size, group_dim, config.weight_algorithm,
        config.weight_clip == "mse", config.refit_rounds, config.gptq_damp, config.act_order,
    )


def _criterion_module(names: list[str]) -> str | None:
    """The module whose output judges a norm's readers: their common parent (self_attn, mlp), or None when
    they sit directly in the block (OPT's fc1), where each linear's own output is measured instead."""
    parents = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    return parents.pop() if len(parents) == 1 and "" not in parents else None


def _capture_calls(layer: nn.Module, module: nn.Module, block_inputs: list) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) `module` receives when `layer` runs on each calibration batch."""
    calls: list[tuple[tuple, dict]] = []

    def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        calls.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for hidden, kwargs in block_inputs:
                try:
                    run_block(layer, hidden, kwargs)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return calls


def _module_outputs(module: nn.Module, calls: list[tuple[tuple, dict]]) -> list[torch.Tensor]:
    outputs = []
    with torch.no_grad():
        for args, kwargs in calls:
            out = module(*args, **kwargs)
            outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def _module_error(
    linear: nn.Linear,
    candidate: adadim.GroupQuantized,
    module: nn.Module,
    calls: list[tuple[tuple, dict]],
    reference: list[torch.Tensor],
) -> float:
    """Mean squared difference of `module`'s output from `reference` with `linear` using the candidate weight."""
    original = linear.weight.data
    linear.weight.data = candidate.dequantize().to(original.dtype)
    try:
        outputs = _module_outputs(module, calls)
    finally:
        linear.weight.data = original
    total = sum(float((o.float() - r.float()).pow(2).sum()) for o, r in zip(outputs, reference))
    return total / sum(r.numel() for r in reference)
