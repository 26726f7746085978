"""`prepare_model_for_training`: PEFT's `prepare_model_for_kbit_training` for hf-outliertune models.

PEFT's helper does not know this quant method: it upcasts every fp16/bf16 parameter (the quantized layers'
biases included) and never turns on gradient checkpointing for it. This one leaves the quantized layers exactly
as stored (integer weights, scales, offsets, biases), upcasts the remaining half-precision parameters (norms,
embeddings, heads) to fp32 as PEFT does, and enables gradient checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .peft_integration import QUANTIZED_LAYERS


def prepare_model_for_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
    upcast_float_params: bool = True,
) -> nn.Module:
    """Freeze `model`, upcast its half-precision parameters outside the quantized layers, enable checkpointing.

    Args:
        model: a transformers model quantized by hf-outliertune (before `get_peft_model`).
        use_gradient_checkpointing: recompute each decoder layer in the backward pass (less activation memory).
        gradient_checkpointing_kwargs: passed to `model.gradient_checkpointing_enable`; default
            `{"use_reentrant": False}` (the reentrant variant also needs input gradients, which are then enabled).
        upcast_float_params: cast fp16/bf16 parameters that are not part of a quantized layer to fp32.
    """
    quantized = [m for m in model.modules() if isinstance(m, QUANTIZED_LAYERS)]
    if not quantized:
        raise ValueError(
            f"{type(model).__name__} has no hf-outliertune quantized layers; quantize it first "
            "(hf_outliertune.quantize or from_pretrained with an OutlierTuneConfig), or for a float or another "
            "quantized model use peft.prepare_model_for_kbit_training."
        )
    keep = {id(p) for m in quantized for p in m.parameters()}
    for param in model.parameters():
        param.requires_grad_(False)
        if upcast_float_params and id(param) not in keep and param.dtype in (torch.float16, torch.bfloat16):
            param.data = param.data.float()
    if use_gradient_checkpointing:
        kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
        if kwargs["use_reentrant"]:
            model.enable_input_require_grads()  # reentrant checkpoints only backprop into inputs that need grad
        if hasattr(model, "activation_checkpointing_enable"):  # transformers' name since 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
