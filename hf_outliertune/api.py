"""`quantize(model, config)`: quantize an already-loaded float model in place (GGUF-loaded models, notebooks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .config import OutlierTuneConfig, check_calibration_device
from .fusion import fuse_activation_quant
from .offload import resolve_device
from .quantizer import OutlierTuneHfQuantizer, apply_quantization


def quantize(
    model: nn.Module, config: OutlierTuneConfig, tokenizer: Any = None, device: str | torch.device | None = None
) -> nn.Module:
    """Calibrate and quantize `model` in place, leaving it exactly as `from_pretrained(..., quantization_config=)`
    would: `save_pretrained` writes a pre-quantized checkpoint that reloads without calibration data.

    `device` (e.g. ``"cuda"``) sets `config.calibration_device`: the model stays where it is (e.g. on CPU, larger
    than the GPU) and each decoder block is calibrated and quantized on `device` in turn, then moved back; the
    activations between blocks wait on CPU. None keeps the config's value (default: calibrate where the model is).
    """
    existing = getattr(model.config, "quantization_config", None)
    if existing is not None:
        raise ValueError(
            f"The model already carries a quantization_config ({type(existing).__name__}). Rebuild it as a float "
            "model first (from_config without that key, then load_state_dict); see hf_outliertune.models."
        )
    if device is not None:
        resolve_device(device)  # a valid device that exists here, checked before any work
        config.calibration_device = check_calibration_device(device)  # stored as its string
    if tokenizer is not None:
        config.tokenizer = tokenizer
    apply_quantization(model, config)
    fuse_activation_quant(model)
    quantizer = OutlierTuneHfQuantizer(config, pre_quantized=False)
    model.config.quantization_config = config
    model.hf_quantizer = quantizer
    model.is_quantized = True
    model.quantization_method = config.quant_method
    return model
