"""Export an hf-outliertune model to the compressed-tensors format (what transformers' built-in
compressed-tensors integration and vLLM load), where its math maps onto that format exactly.

    export_compressed_tensors(model, "out_dir", tokenizer)
    AutoModelForCausalLM.from_pretrained("out_dir")   # plain transformers + compressed-tensors, no hf_outliertune

What maps (docs/export.md has the formulas):

- OutlierTune W8A8 / W6A6 (`int-quantized`): the per-channel activation steps Δ are already folded into the
  norm weights (and the shifts z into norm biases), so a norm-fed linear sees its input on the integer grid:
  static per-tensor activations with scale 1, per-output-channel symmetric weights `W ≈ codes · weight_scale`.
  Linears with `non_norm_activations="static"` (step folded into the producing linear) map the same way.
  Per-token dynamic inputs map to the `token` strategy with `dynamic=True`.
- AdaDim weight-only per-OC groups (`pack-quantized`): asymmetric `group` strategy (`channel` for one group per
  row) with zero points; unsigned codes `u` and zero `z` become compressed-tensors' signed `u − 2^(b−1)` and
  `z − 2^(b−1)`, which dequantize to the same `(u − z) · scale`.

What is refused (`ExportError`, naming the layers and the re-quantization that avoids it): the online
block-Hadamard rotation of per-token inputs (`rotate_dynamic=True`), per-channel activation offsets from
symmetrization shifts that no norm bias absorbed (bias-free RMSNorm models), biases the plain architecture
lacks, per-IC weight groups (AdaDim's other layout) and ragged last groups.

The tensors are produced by compressed-tensors' own compressors from the exactly dequantized weights, and the
integer codes they produce are checked against the stored ones; the key set is checked against what
compressed-tensors itself creates for the architecture, so a mismatch fails here rather than at load time.
"""

from __future__ import annotations

import copy
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .adadim import dequantize as dequantize_groups
from .config import OutlierTuneConfig
from .hub import _ATTR as _HUB_ATTR
from .hub import model_tokenizer, quantization_config_of
from .kernels.packing import unpack_codes
from .modules import OutlierTuneLinear
from .weight_only_linear import WeightOnlyLinear

FORMAT = "compressed-tensors"
# Bit widths vLLM's compressed-tensors kernels run (int W8A8: 8; pack-quantized weight-only: 4 and 8). Other
# widths are valid compressed-tensors and load in transformers, so they are exported with a warning.
VLLM_W8A8_BITS = (8,)
VLLM_WEIGHT_ONLY_BITS = (4, 8)
SUPPORTED_CT_VERSION = "0.17."  # the compressed-tensors releases the export is tested against
_SHOWN = 6  # layers named per problem in an error message


class ExportError(ValueError):
    """The quantized model uses something the compressed-tensors format cannot express."""


@dataclass
class _Layer:
    """One quantized linear and how it maps onto compressed-tensors."""

    name: str
    module: nn.Module
    weights: Any  # compressed_tensors QuantizationArgs
    inputs: Any  # QuantizationArgs or None (weight-only)
    format: str  # CompressionFormat value

    @property
    def key(self) -> str:
        """Layers with equal keys share one config group."""
        inputs = self.inputs.model_dump_json() if self.inputs is not None else "none"
        return f"{self.format}|{self.weights.model_dump_json()}|{inputs}"


def _ct():
    """The compressed-tensors package (imported lazily: it is only needed to export)."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError as err:
        raise ImportError(
            "Exporting to the compressed-tensors format needs the compressed-tensors package: "
            "pip install 'hf-outliertune[export]' (compressed-tensors 0.17.x)"
        ) from err
    version = getattr(compressed_tensors, "__version__", "unknown")
    if not version.startswith(SUPPORTED_CT_VERSION):
        raise ImportError(
            f"compressed-tensors {version} is installed; the export is written and tested for "
            f"{SUPPORTED_CT_VERSION}x (newer releases store pack-quantized zero points differently). "
            "pip install 'hf-outliertune[export]' installs a supported version."
        )
    return compressed_tensors


# ------------------------------------------------------------------------------------------------ planning


def _w8a8_layer(name: str, module: OutlierTuneLinear, problems: dict[str, list[str]]) -> _Layer | None:
    from compressed_tensors.quantization import QuantizationArgs

    if module.hadamard_block > 1:
        problems["hadamard"].append(f"{name} (block {module.hadamard_block})")
        return None
    if module.input_offset is not None:
        problems["offset"].append(name)
        return None
    weights = QuantizationArgs(num_bits=module.weight_bits, type="int", symmetric=True, strategy="channel",
                               dynamic=False)
    if module.act_mode == "static":  # the input is already on the integer grid: one step of 1 for the tensor
        inputs = QuantizationArgs(num_bits=module.act_bits, type="int", symmetric=True, strategy="tensor",
                                  dynamic=False)
    else:
        inputs = QuantizationArgs(num_bits=module.act_bits, type="int", symmetric=True, strategy="token",
                                  dynamic=True)
    return _Layer(name, module, weights, inputs, "int-quantized")


def _weight_only_layer(name: str, module: WeightOnlyLinear, problems: dict[str, list[str]]) -> _Layer | None:
    from compressed_tensors.quantization import QuantizationArgs

    if module.group_dim != "oc":
        problems["per_ic"].append(name)
        return None
    zero = module.weight_zero.detach().float()
    if not torch.equal(zero, zero.round()):
        problems["fractional_zero"].append(name)
        return None
    k, g = module.in_features, module.group_size
    if k <= g:  # one group per output row: compressed-tensors' channel strategy
        weights = QuantizationArgs(num_bits=module.bits, type="int", symmetric=False, strategy="channel")
    elif k % g:
        problems["ragged"].append(f"{name} (in_features {k})")
        return None
    else:
        weights = QuantizationArgs(num_bits=module.bits, type="int", symmetric=False, strategy="group",
                                   group_size=g)
    return _Layer(name, module, weights, None, "pack-quantized")


_FIXES = {
    "hadamard": (
        "These per-token layers rotate their input by a block-Hadamard transform at run time (hadamard_block > 1, "
        "from OutlierTuneConfig(rotate_dynamic=True), the default); compressed-tensors has no such online rotation "
        "(its transform_config is not applied by transformers at load time), so the rotated weights would be "
        "applied to unrotated inputs. Re-quantize with rotate_dynamic=False (CLI: --no-rotate) or "
        "non_norm_activations='static' (CLI: --non-norm-activations static)"
    ),
    "offset": (
        "These static layers subtract a per-channel symmetrization shift from their input before rounding "
        "(input_offset = z/Δ, from OutlierTuneConfig(symmetrize=True)) because their norm has no bias to absorb "
        "it (RMSNorm: Llama, Qwen, Mistral, Gemma...); compressed-tensors has no per-channel activation offset, "
        "and the shift's correction W·z lives in biases these architectures lack. Re-quantize with "
        "symmetrize=False (CLI: --no-symmetrize); shifts export only where the norm has a bias (OPT's LayerNorm)"
    ),
    "per_ic": (
        "These layers use AdaDim per-IC groups (group_size consecutive output channels of one input column); "
        "compressed-tensors' group strategy only groups consecutive input channels of one output row (per-OC). "
        "Re-quantize with group_dim='oc' (CLI: --group-dim oc)"
    ),
    "fractional_zero": (
        "These layers have fractional zero points: the group-parameter refit (OutlierTuneConfig(refit_rounds=2), "
        "the default with calibration data) fits each group's zero freely, and compressed-tensors stores integer "
        "zero points. Re-quantize with refit_rounds=0 (CLI: --refit-rounds 0), at some cost in accuracy "
        "(docs/accuracy.md, the refit ablation)"
    ),
    "ragged": (
        "in_features is not a multiple of group_size, so the last group of each row is smaller; compressed-tensors "
        "needs equal groups. Re-quantize with a group_size that divides in_features"
    ),
    "tables": (
        "These are quantized token embeddings / lm_heads (OutlierTuneConfig(embedding_bits=...)); this exporter "
        "writes quantized linears of the decoder blocks only. Re-quantize with embedding_bits=None (the default)"
    ),
    "module": (
        "These quantized linears are wrapped or replaced (e.g. by PEFT LoRA layers); export the model without "
        "adapters (merge them into a float model and quantize that, or drop them)"
    ),
}


def _shown(names: list[str]) -> str:
    """The first `_SHOWN` names, and how many more there are."""
    return ", ".join(names[:_SHOWN]) + (f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else "")


def _raise_problems(problems: dict[str, list[str]], model_type: str | None) -> None:
    found = {kind: names for kind, names in problems.items() if names}
    if not found:
        return
    parts = []
    for kind, names in found.items():
        parts.append(f"{_FIXES[kind]}. Layers: {_shown(names)}.")
    raise ExportError(
        f"Cannot export this {model_type or ''} model to the {FORMAT} format: " + " ".join(parts)
    )


def _plan(model: nn.Module) -> tuple[OutlierTuneConfig, list[_Layer]]:
    """The mapping of every quantized linear; `ExportError` listing everything that cannot be expressed."""
    qc = quantization_config_of(model)
    problems: dict[str, list[str]] = {k: [] for k in _FIXES}
    layers: list[_Layer] = []
    for name, fmt in qc.module_formats.items():
        if "table" in fmt:
            problems["tables"].append(name)
            continue
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        if isinstance(module, OutlierTuneLinear):
            layer = _w8a8_layer(name, module, problems)
        elif isinstance(module, WeightOnlyLinear):
            layer = _weight_only_layer(name, module, problems)
        elif isinstance(module, nn.Linear):
            continue  # a float reader of a folded norm ("act": "float"): exported as a plain linear
        else:
            problems["module"].append(f"{name} ({type(module).__name__})")
            continue
        if layer is not None:
            layers.append(layer)
    _raise_problems(problems, getattr(model.config, "model_type", None))
    if not layers:
        raise ExportError("The model has no quantized linear layer to export.")
    _warn_vllm(layers)
    return qc, layers


def _warn_vllm(layers: list[_Layer]) -> None:
    """Valid compressed-tensors that transformers runs but vLLM's kernels do not: export, with a warning."""
    w8a8 = sorted({(lay.weights.num_bits, lay.inputs.num_bits) for lay in layers if lay.inputs is not None})
    if any(w not in VLLM_W8A8_BITS or a not in VLLM_W8A8_BITS for w, a in w8a8):
        warnings.warn(
            f"Exporting W{w8a8[0][0]}A{w8a8[0][1]}: compressed-tensors and transformers handle it, but vLLM's int "
            "W8A8 kernels need 8-bit weights and activations and will refuse to load this directory.",
            UserWarning, stacklevel=3,
        )
    bits = sorted({lay.weights.num_bits for lay in layers if lay.inputs is None})
    if any(b not in VLLM_WEIGHT_ONLY_BITS for b in bits):
        warnings.warn(
            f"Exporting {bits[0]}-bit weight-only groups: compressed-tensors packs and transformers runs them, but "
            f"vLLM's pack-quantized kernels support {list(VLLM_WEIGHT_ONLY_BITS)}-bit weights only.",
            UserWarning, stacklevel=3,
        )


def _layer_suffix(name: str) -> str | None:
    """`mlp.down_proj` for `model.layers.3.mlp.down_proj`: the name inside its decoder block."""
    m = re.match(r"^.*?\.\d+\.(.+)$", name)
    return m.group(1) if m else None


def _targets(groups: dict[str, list[_Layer]]) -> dict[str, list[str]]:
    """Config-group targets: the class `Linear` when one scheme covers every quantized layer; otherwise one
    regex per in-block name (`re:.*\\.mlp\\.down_proj$`) the group owns in every block, else exact names."""
    if len(groups) == 1:
        return {key: ["Linear"] for key in groups}
    owner: dict[str | None, set[str]] = {}
    for key, layers in groups.items():
        for lay in layers:
            owner.setdefault(_layer_suffix(lay.name), set()).add(key)
    out = {}
    for key, layers in groups.items():
        targets: list[str] = []
        for lay in layers:
            suffix = _layer_suffix(lay.name)
            target = f"re:.*\\.{re.escape(suffix)}$" if suffix is not None and owner[suffix] == {key} else lay.name
            if target not in targets:
                targets.append(target)
        out[key] = targets
    return out


def compressed_tensors_config(model: nn.Module):
    """The compressed-tensors `QuantizationConfig` an export of `model` carries (raises `ExportError` when the
    model cannot be exported). Every linear that stays in floating point (lm_head, excluded layers) is listed
    in `ignore`, as vLLM requires of linears no config group targets."""
    return _build_config(model, _plan(model)[1])[0]


def _build_config(model: nn.Module, layers: list[_Layer]) -> tuple[Any, dict[str, Any]]:
    """The `QuantizationConfig` and the scheme of each layer key."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme, QuantizationStatus

    groups: dict[str, list[_Layer]] = {}
    for lay in layers:
        groups.setdefault(lay.key, []).append(lay)
    targets = _targets(groups)
    schemes = {
        key: QuantizationScheme(targets=targets[key], weights=members[0].weights, input_activations=members[0].inputs)
        for key, members in groups.items()
    }
    formats = sorted({lay.format for lay in layers})
    ignore = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    qconfig = QuantizationConfig(
        config_groups={f"group_{i}": scheme for i, scheme in enumerate(schemes.values())},
        format=formats[0] if len(formats) == 1 else "mixed-precision",
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=ignore,
    )
    return qconfig, schemes


# --------------------------------------------------------------------------------------------- compression


def _compress_w8a8(lay: _Layer, scheme) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import BaseCompressor

    m: OutlierTuneLinear = lay.module
    codes = m.weight.detach().cpu()
    scale = m.weight_scale.detach().float().cpu().reshape(-1, 1)
    compressor = BaseCompressor.get_value_from_registry(lay.format)
    out = compressor.compress({"weight": codes.float() * scale, "weight_scale": scale}, scheme)
    if not torch.equal(out["weight"], codes):
        raise RuntimeError(f"{lay.name}: compressed-tensors re-quantized the weight to other codes (internal error).")
    if lay.inputs.strategy == "tensor":
        out["input_scale"] = torch.ones(1, dtype=torch.float32)
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _compress_weight_only(lay: _Layer, scheme) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    m: WeightOnlyLinear = lay.module
    codes = unpack_codes(m.qweight.detach().cpu(), m.bits, m.in_features)
    scale = m.weight_scale.detach().cpu()
    zero = m.weight_zero.detach().cpu().float()
    half = 1 << (m.bits - 1)
    if not (torch.equal(zero, zero.round()) and bool((zero >= 0).all()) and bool((zero < 2 * half).all())):
        raise ExportError(f"{lay.name}: its zero points are not integer codes in [0, {2 * half - 1}]; the "
                          "checkpoint is corrupt.")
    weight = dequantize_groups(codes, scale, m.weight_zero.detach().cpu(), m.group_size, "oc")
    state = {"weight": weight, "weight_scale": scale.float(), "weight_zero_point": (zero - half).to(torch.int8)}
    compressor = BaseCompressor.get_value_from_registry(lay.format)
    out = compressor.compress(state, scheme)
    signed = (codes.to(torch.int16) - half).to(torch.int8)
    if not torch.equal(unpack_from_int32(out["weight_packed"], m.bits, codes.shape), signed):
        raise RuntimeError(f"{lay.name}: compressed-tensors packed other codes than the stored ones (internal error).")
    out["weight_scale"] = scale  # fp16, as the plugin stores it (exact; loaders cast to their dtype)
    if m.bias is not None:
        out["bias"] = m.bias.detach().cpu()
    return out


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of tied parameters (lm_head tied to the embeddings)."""
    canonical = {n for n, _ in model.named_parameters()}
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v for k, v in model.state_dict().items() if k in canonical or k not in every}


def _plain_config(model: nn.Module):
    """The model's config without the hf_outliertune quantization config."""
    config = copy.copy(model.config)
    config.__dict__.pop("quantization_config", None)
    return config


def _reference_state(config, qconfig) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Name → (shape, dtype) of what transformers' compressed-tensors loader expects for this architecture:
    the same steps it runs at load time (`apply_quantization_config`, `compress_model`), on the meta device."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import apply_quantization_config
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        ref = AutoModelForCausalLM.from_config(config)
    apply_quantization_config(ref, qconfig, run_compressed=False)
    ModelCompressor(quantization_config=copy.deepcopy(qconfig)).compress_model(ref)
    return {k: (tuple(v.shape), v.dtype) for k, v in _unique_state(ref).items()}


def _check_against_reference(state: dict[str, torch.Tensor], expected: dict, model_type: str | None) -> None:
    extra_bias = sorted(k for k in state if k not in expected and k.endswith(".bias"))
    if extra_bias:
        raise ExportError(
            f"Cannot export this {model_type} model to the {FORMAT} format: folding a symmetrization shift gave "
            f"these linears a bias (b = W·z) that the {model_type} architecture does not have, so a plain "
            f"transformers or vLLM model would drop it: {_shown(extra_bias)}. Re-quantize with symmetrize=False "
            "(CLI: --no-symmetrize)."
        )
    problems = [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"missing {k}" for k in expected if k not in state]
    for k, (shape, dtype) in expected.items():
        if k in state and tuple(state[k].shape) != shape:
            problems.append(f"{k} has shape {list(state[k].shape)}, expected {list(shape)}")
        if k in state and not dtype.is_floating_point and state[k].dtype != dtype:
            problems.append(f"{k} has dtype {state[k].dtype}, expected {dtype}")
    if problems:
        raise RuntimeError(f"The {FORMAT} export does not match what the loader expects: {'; '.join(problems[:8])} "
                           "(internal error; please report it).")


def compressed_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], Any]:
    """The compressed-tensors state dict of `model` and its `QuantizationConfig`, checked against the keys,
    shapes and integer dtypes compressed-tensors creates for the plain architecture."""
    _, layers = _plan(model)  # first: what cannot be exported is reported without compressed-tensors installed
    _ct()
    qconfig, scheme_of = _build_config(model, layers)
    quantized = {lay.name for lay in layers}
    state = {k: v.detach().cpu() for k, v in _unique_state(model).items() if k.rpartition(".")[0] not in quantized}
    for lay in layers:
        compress = _compress_w8a8 if lay.inputs is not None else _compress_weight_only
        for leaf, tensor in compress(lay, scheme_of[lay.key]).items():
            state[f"{lay.name}.{leaf}"] = tensor.contiguous()
    expected = _reference_state(_plain_config(model), qconfig)
    _check_against_reference(state, expected, getattr(model.config, "model_type", None))
    return state, qconfig


# ------------------------------------------------------------------------------------------------- writing


def export_compressed_tensors(
    model: nn.Module,
    save_directory: str | os.PathLike,
    tokenizer: Any = None,
    max_shard_size: int | str = "5GB",
) -> str:
    """Write `model` (quantized by hf-outliertune) to `save_directory` in the compressed-tensors format.

    The directory holds `config.json` with the compressed-tensors `quantization_config`, the safetensors
    weights (sharded by `max_shard_size`), `generation_config.json` and the tokenizer (`tokenizer`, else the
    calibration tokenizer or the one next to the model's source). Plain transformers loads it with
    `AutoModelForCausalLM.from_pretrained(save_directory)` through its compressed-tensors integration, without
    hf_outliertune. Raises `ExportError` (a `ValueError`) naming the layers when the model uses something the
    format cannot express (see docs/export.md); nothing is written then. Returns `save_directory`.
    """
    from huggingface_hub import save_torch_state_dict

    save_directory = os.fspath(save_directory)
    if os.path.isfile(save_directory):
        raise ValueError(f"{save_directory} is a file; pass a directory to export into.")
    source = getattr(model, "name_or_path", None)
    if source and os.path.isdir(source) and os.path.isdir(save_directory) and os.path.samefile(source, save_directory):
        raise ValueError(f"{save_directory} holds the hf-outliertune checkpoint being exported; export into another "
                         "directory.")
    state, qconfig = compressed_state_dict(model)
    from compressed_tensors.compressors import ModelCompressor  # present: compressed_state_dict checked it

    os.makedirs(save_directory, exist_ok=True)
    config = _plain_config(model)
    config.save_pretrained(save_directory)
    ModelCompressor(quantization_config=qconfig).update_config(save_directory)
    save_torch_state_dict(state, save_directory, max_shard_size=max_shard_size)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and model.can_generate():
        generation_config.save_pretrained(save_directory)
    extras = getattr(model, _HUB_ATTR, None)
    tokenizer = tokenizer or getattr(extras, "tokenizer", None) or model_tokenizer(model)
    if tokenizer is not None:
        tokenizer.save_pretrained(save_directory)
    return save_directory
