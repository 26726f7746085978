"""Where the normalizations and linears sit in each supported decoder architecture.

OutlierTune folds the per-channel activation step into the normalization that produces a linear's input, so
it must know, per architecture, which norm feeds which linears. Anything not listed here is refused with a
clear error rather than quantized wrongly.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch.nn as nn


@dataclass(frozen=True)
class NormGroup:
    """A normalization and the linears that read its output (names relative to the decoder block)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class ArchSpec:
    """Layout of one architecture's decoder blocks.

    `stages` is the order in which a block's linears are calibrated (true-sequential): each entry is
    either a `NormGroup` (static per-channel path) or a tuple of linears that read a non-norm input
    (dynamic per-token path).
    """

    layers_path: str
    stages: tuple[NormGroup | tuple[str, ...], ...]
    norm_weight_offset: float = 0.0  # Gemma norms scale by (1 + weight)
    # consumer linear -> producer linear whose output rows feed it linearly (V -> o_proj through the
    # attention average, up -> down_proj through the gate product): a per-channel scale on the
    # consumer's input can be folded exactly into the producer's rows.
    producers: tuple[tuple[str, str], ...] = ()

    @property
    def norm_groups(self) -> tuple[NormGroup, ...]:
        return tuple(s for s in self.stages if isinstance(s, NormGroup))

    @property
    def all_linears(self) -> tuple[str, ...]:
        names: list[str] = []
        for stage in self.stages:
            names.extend(stage.linears if isinstance(stage, NormGroup) else stage)
        return tuple(names)


_ATTN_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_LLAMA_LIKE = ArchSpec(
    layers_path="model.layers",
    stages=(
        NormGroup("input_layernorm", _ATTN_QKV),
        ("self_attn.o_proj",),
        NormGroup("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.down_proj",),
    ),
    producers=(("self_attn.o_proj", "self_attn.v_proj"), ("mlp.down_proj", "mlp.up_proj")),
)
_GEMMA = replace(_LLAMA_LIKE, norm_weight_offset=1.0)
# Gemma 2/3: the MLP reads pre_feedforward_layernorm; post_* norms act on sub-layer outputs, not linear inputs
_GEMMA2_3 = replace(
    _GEMMA,
    stages=(
        NormGroup("input_layernorm", _ATTN_QKV),
        ("self_attn.o_proj",),
        NormGroup("pre_feedforward_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.down_proj",),
    ),
)
_OPT = ArchSpec(
    layers_path="model.decoder.layers",
    stages=(
        NormGroup("self_attn_layer_norm", _ATTN_QKV),
        ("self_attn.out_proj",),
        NormGroup("final_layer_norm", ("fc1",)),
        ("fc2",),
    ),
    # fc2 reads relu(fc1(x)); relu(x)/s = relu(x/s) for s > 0, so fc1's rows can absorb the scale
    producers=(("self_attn.out_proj", "self_attn.v_proj"), ("fc2", "fc1")),
)

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _GEMMA,
    "gemma2": _GEMMA2_3,
    "gemma3_text": _GEMMA2_3,
    "opt": _OPT,
}


class UnsupportedArchitectureError(ValueError):
    """The model's architecture or one of its blocks does not match a layout hf-outliertune knows."""


def resolve_arch(model: nn.Module) -> ArchSpec:
    """Return the `ArchSpec` of `model`, checking that every block really has the expected modules."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = ARCHITECTURES.get(model_type)
    if spec is None:
        raise UnsupportedArchitectureError(
            f"hf-outliertune does not support model_type={model_type!r}. Supported: {sorted(ARCHITECTURES)}. "
            "Quantizing an unknown layout could fold scales into the wrong modules, so it is refused."
        )
    if model_type == "opt" and getattr(config, "activation_function", "relu") != "relu":
        spec = replace(spec, producers=spec.producers[:1])
    if model_type == "opt" and not getattr(config, "do_layer_norm_before", True):
        raise UnsupportedArchitectureError(
            "OPT models with do_layer_norm_before=False (post-norm, e.g. opt-350m) are not supported: their "
            "linears do not read a normalization output."
        )
    layers = decoder_layers(model, spec)
    for i, layer in enumerate(layers):
        for name in (*[g.norm for g in spec.norm_groups], *spec.all_linears):
            module = _get_submodule_or_none(layer, name)
            if module is None:
                raise UnsupportedArchitectureError(
                    f"{model_type}: decoder block {i} has no submodule {name!r}; this variant of the "
                    "architecture is not supported."
                )
        for name in spec.all_linears:
            if not isinstance(layer.get_submodule(name), nn.Linear):
                raise UnsupportedArchitectureError(
                    f"{model_type}: block {i} {name} is a {type(layer.get_submodule(name)).__name__}, not "
                    "nn.Linear (MoE experts and other custom layers are not supported yet)."
                )
    return spec


def decoder_layers(model: nn.Module, spec: ArchSpec) -> nn.ModuleList:
    """The model's list of decoder blocks."""
    layers = _get_submodule_or_none(model, spec.layers_path)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise UnsupportedArchitectureError(
            f"expected the decoder blocks at {spec.layers_path!r}, found {type(layers).__name__}."
        )
    return layers


def _get_submodule_or_none(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None
