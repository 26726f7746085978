"""Thin glue: the transformers `HfQuantizer` for OutlierTune, and its idempotent registration."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from transformers import AutoTokenizer
from transformers.quantizers import HfQuantizer
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)

from .calibration import CalibrationError, load_texts
from .checkpoint import CheckpointError, check_weight_only_format, expected_tensors, verify_checkpoint
from .config import FORMAT_VERSION, QUANT_METHOD, OutlierTuneConfig
from .embeddings import (
    EMBEDDING_ACT,
    TIED_HEAD_ACT,
    QuantizedEmbedding,
    TiedQuantizedHead,
    quantize_embeddings,
    untie,
)
from .fusion import fuse_activation_quant
from .hub import attach
from .modules import ACT_MODES, OutlierTuneLinear
from .offload import check_materialized, resolve_device
from .pipeline import quantize_model
from .weight_only_linear import WEIGHT_ONLY_ACT, WeightOnlyLinear
from .weight_only_pipeline import quantize_weight_only


class OutlierTuneHfQuantizer(HfQuantizer):
    """Quantize on load (calibration after the float weights are loaded) or load a pre-quantized checkpoint."""

    requires_calibration = False

    def validate_environment(self, *args: Any, device_map: Any = None, **kwargs: Any) -> None:
        if not self.pre_quantized and self.quantization_config.needs_calibration:
            load_texts(self.quantization_config.dataset)  # fail before loading weights, not after
        if not self.pre_quantized:
            resolve_device(self.quantization_config.calibration_device)  # e.g. 'cuda' on a machine without one
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("hf-outliertune does not support disk offload; use a device_map without 'disk'.")

    def _process_model_before_weight_loading(self, model: nn.Module, checkpoint_files=None, **kwargs: Any) -> None:
        if not self.pre_quantized:
            return
        formats = self.quantization_config.module_formats
        if not formats:
            raise CheckpointError(
                "This checkpoint's quantization_config has no module_formats, so its quantized layers cannot be "
                "rebuilt. It was not saved by hf-outliertune or its config.json was edited; re-save it."
            )
        shapes = replace_modules(model, formats, self.quantization_config)
        verify_checkpoint(checkpoint_files, expected_tensors(formats, shapes))

    def param_needs_quantization(self, model: nn.Module, param_name: str, **kwargs: Any) -> bool:
        return False  # weights load in float; calibration runs once they are all in place

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> None:
        if not self.pre_quantized:
            apply_quantization(model, self.quantization_config)
        fuse_activation_quant(model)
        attach(model)  # save_pretrained / push_to_hub write complete repositories (hub.py)

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return True  # LoRA adapters train on top (peft_integration.py); the quantized weights stay frozen

    @property
    def is_compileable(self) -> bool:
        return True  # the kernels are torch custom ops with fake implementations, safe in CUDA graphs


def replace_modules(
    model: nn.Module, module_formats: dict[str, dict[str, Any]], config: OutlierTuneConfig
) -> dict[str, tuple[int, int]]:
    """Swap the named float modules for empty quantized ones (`OutlierTuneLinear`, `WeightOnlyLinear`,
    `QuantizedEmbedding`, `TiedQuantizedHead`), or give float readers of a folded norm the bias the fold created;
    return their (out, in) shapes (an embedding's: (vocabulary, hidden))."""
    shapes = {}
    tied_heads = {name: fmt for name, fmt in module_formats.items() if _act(fmt) == TIED_HEAD_ACT}
    for name, fmt in module_formats.items():
        if name in tied_heads:
            continue
        if _act(fmt) == EMBEDDING_ACT:
            shapes[name] = _replace_embedding(model, name, fmt)
        else:
            shapes[name] = _replace_linear(model, name, fmt, config)
    for name, fmt in tied_heads.items():  # after their tables exist
        shapes[name] = _replace_tied_head(model, name, fmt)
    untie(model, {n for n, f in module_formats.items() if isinstance(f, dict) and "table" in f})
    return shapes


def _act(fmt: Any) -> Any:
    return fmt.get("act") if isinstance(fmt, dict) else None


def _submodule(model: nn.Module, name: str, kind: type, what: str) -> nn.Module:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, kind):
        raise CheckpointError(
            f"The quantization config names {name!r}, which is not {what} of this {type(model).__name__}; the "
            "checkpoint does not match the model's architecture."
        )
    return module


def _replace_linear(model: nn.Module, name: str, fmt: dict, config: OutlierTuneConfig) -> tuple[int, int]:
    linear = _submodule(model, name, nn.Linear, "a linear layer")
    act = _act(fmt)
    if act not in (*ACT_MODES, "float", WEIGHT_ONLY_ACT):
        valid = [*ACT_MODES, "float", WEIGHT_ONLY_ACT, EMBEDDING_ACT, TIED_HEAD_ACT]
        raise CheckpointError(
            f"module_formats[{name!r}] = {fmt!r} has no valid 'act' (one of {valid}); "
            "the config.json is corrupt or from another tool. Re-save the checkpoint."
        )
    shape = (linear.out_features, linear.in_features)
    if act == "float":  # a float reader of a folded norm that received a bias from the fold
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.empty(linear.out_features, device=linear.weight.device,
                                                   dtype=linear.weight.dtype))
        return shape
    if act == WEIGHT_ONLY_ACT:
        check_weight_only_format(name, fmt)
        new = WeightOnlyLinear(linear.in_features, linear.out_features, bool(fmt.get("bias")), fmt["bits"],
                               fmt["group_size"], fmt["group_dim"], linear.weight.dtype, linear.weight.device)
        model.set_submodule(name, new)
        return shape
    with torch.device(linear.weight.device):
        new = OutlierTuneLinear(
            linear.in_features,
            linear.out_features,
            bias=bool(fmt.get("bias")),
            act_mode=fmt["act"],
            has_input_offset=bool(fmt.get("offset")),
            weight_bits=config.weight_bits,
            act_bits=config.act_bits,
            hadamard_block=int(fmt.get("hadamard", 1)),
            dtype=linear.weight.dtype,
        )
    model.set_submodule(name, new)
    return shape


def _replace_embedding(model: nn.Module, name: str, fmt: dict) -> tuple[int, int]:
    embedding = _submodule(model, name, nn.Embedding, "a token embedding")
    check_weight_only_format(name, fmt)
    if fmt["group_dim"] != "oc":
        raise CheckpointError(f"module_formats[{name!r}] = {fmt!r}: an embedding table is grouped along its rows "
                              "('group_dim': 'oc'); the config.json is corrupt. Re-save the checkpoint.")
    table = QuantizedEmbedding(embedding.num_embeddings, embedding.embedding_dim, fmt["bits"], fmt["group_size"],
                               fmt.get("padding_idx"), embedding.weight.dtype, embedding.weight.device)
    model.set_submodule(name, table)
    return embedding.num_embeddings, embedding.embedding_dim


def _replace_tied_head(model: nn.Module, name: str, fmt: dict) -> tuple[int, int]:
    _submodule(model, name, nn.Linear, "an output embedding (lm_head)")
    source = fmt.get("source")
    table = _submodule(model, source, QuantizedEmbedding, "a quantized embedding") if isinstance(source, str) else None
    if table is None:
        raise CheckpointError(f"module_formats[{name!r}] = {fmt!r} names no 'source' embedding; the config.json is "
                              "corrupt. Re-save the checkpoint.")
    model.set_submodule(name, TiedQuantizedHead(table))
    return table.num_embeddings, table.embedding_dim


def resolve_tokenizer(tokenizer: Any, model: nn.Module) -> Any:
    """The calibration tokenizer: an object, a name/path, or the model's own."""
    if tokenizer is not None and not isinstance(tokenizer, str):
        return tokenizer
    source = tokenizer or getattr(model.config, "_name_or_path", None)
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as err:
        raise CalibrationError(
            f"Could not load a tokenizer from {source!r} ({err}); pass OutlierTuneConfig(tokenizer=...)."
        ) from err


def apply_quantization(model: nn.Module, config: OutlierTuneConfig) -> None:
    """Run the calibration pipeline and record what a reload needs in `config`.

    With `config.calibration_device` set, the model stays where it is (typically CPU, e.g. loaded with
    `device_map="cpu"`) and each decoder block is calibrated and quantized on that device in turn (offload.py)."""
    check_materialized(model)
    tokenizer = resolve_tokenizer(config.tokenizer, model) if config.needs_calibration else None
    run = quantize_weight_only if config.weight_only else quantize_model
    tables = {}
    if config.embedding_bits is not None:  # first: the blocks are calibrated on the quantized embeddings' output
        tables = quantize_embeddings(model, config.embedding_bits, config.modules_to_not_convert)
    config.module_formats = {**run(model, config, tokenizer), **tables}
    config.format_version = FORMAT_VERSION
    config.calibration_summary = {
        "num_samples": config.num_samples,
        "seq_len": config.seq_len,
        "tokens": config.num_samples * config.seq_len,
    } if config.needs_calibration else None
    attach(model)  # also for hf_outliertune.quantize(), which does not pass through the quantizer


def register() -> None:
    """Register the config and quantizer with transformers; safe to call any number of times."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(OutlierTuneConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(OutlierTuneHfQuantizer)
