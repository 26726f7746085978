"""Export to the compressed-tensors format, loaded back by plain transformers (its compressed-tensors
integration, no hf_outliertune modules involved): same logits as the plugin's own model; settings the format
cannot express are refused with an error that names the layers and the fix, and nothing is written."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import ExportError, OutlierTuneLinear, export_compressed_tensors
from hf_outliertune.weight_only_linear import WeightOnlyLinear

from conftest import logits_of, rel_err, small_config
from tiny_models import ARCH_CONFIGS, tiny_model

pytest.importorskip("compressed_tensors")

IDS = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
PLAIN_W8A8 = dict(rotate_dynamic=False, symmetrize=False)
# integer zero points, as compressed-tensors stores them: no group-parameter refit
WO_OC = dict(act_bits=None, weight_bits=4, group_size=16, group_dim="oc", weight_algorithm="gptq", gptq_damp=0.01,
             refit_rounds=0)


def _quantized(arch: str, **overrides):
    if arch == "llama-ffn96":  # an intermediate size that group_size 64 does not divide
        config = AutoConfig.for_model("llama", **dict(ARCH_CONFIGS["llama"], intermediate_size=96))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    else:
        model = tiny_model(arch)
    hf_outliertune.quantize(model, small_config(**overrides))
    return model


def _load_plain(directory) -> torch.nn.Module:
    loaded = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    assert not any(isinstance(m, (OutlierTuneLinear, WeightOnlyLinear)) for m in loaded.modules())
    return loaded


@pytest.mark.parametrize(
    "arch, overrides, tol",
    [
        # W8A8: compressed-tensors clamps symmetric int8 inputs to [-128, 127], the plugin to [-127, 127]; the
        # clipped outliers of the tiny random model make that a few 1e-3 of the logits.
        ("llama", PLAIN_W8A8, 1e-2),
        ("llama", dict(PLAIN_W8A8, non_norm_activations="static"), 1e-2),
        ("opt", dict(rotate_dynamic=False), 1e-2),  # symmetrization shifts absorbed by LayerNorm biases
        ("llama", WO_OC, 1e-6),  # weight-only: the same dequantized weights
        ("llama", dict(WO_OC, weight_bits=8, group_size=64), 1e-6),  # one group per row: channel strategy
    ],
    ids=["w8a8-dynamic-non-norm", "w8a8-all-static", "opt-w8a8-symmetrized", "adadim-w4-per-oc", "w8-channel"],
)
def test_export_loads_in_transformers_with_the_same_logits(arch, overrides, tol, tmp_path):
    model = _quantized(arch, **overrides)
    export_compressed_tensors(model, tmp_path)
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qconfig["quant_method"] == "compressed-tensors"
    assert not any(name.endswith(".bin") for name in os.listdir(tmp_path))
    loaded = _load_plain(tmp_path)
    err = rel_err(logits_of(model, IDS), logits_of(loaded, IDS))
    assert err < tol, err


def test_w8a8_scheme_is_static_tensor_inputs_and_channel_weights(tmp_path):
    export_compressed_tensors(_quantized("llama", **PLAIN_W8A8, non_norm_activations="static"), tmp_path)
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"]["config_groups"]
    schemes = list(groups.values())
    assert schemes and all(s["weights"]["strategy"] == "channel" and s["weights"]["symmetric"] for s in schemes)
    assert all(s["input_activations"]["strategy"] == "tensor" and not s["input_activations"]["dynamic"]
               for s in schemes)


@pytest.mark.parametrize(
    "arch, overrides, match",
    [
        ("llama", {}, "rotate_dynamic=False"),  # defaults: online Hadamard rotation and unabsorbed shifts
        ("llama", dict(rotate_dynamic=False), "symmetrize=False"),  # RMSNorm has no bias for the shifts
        ("llama", dict(WO_OC, group_dim="ic"), "group_dim='oc'"),
        ("llama-ffn96", dict(WO_OC, group_size=64), "divides in_features"),  # down_proj: 96 = 64 + a group of 32
        ("llama", dict(WO_OC, refit_rounds=2), "refit_rounds=0"),  # refitted grids have fractional zero points
    ],
    ids=["hadamard", "symmetrization-shift", "per-ic", "ragged-groups", "fractional-zeros"],
)
def test_unsupported_settings_are_refused_and_nothing_is_written(arch, overrides, match, tmp_path):
    model = _quantized(arch, **overrides)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=match) as info:
        export_compressed_tensors(model, out)
    assert "model.layers.0." in str(info.value)  # the layers are named
    assert not out.exists()


def test_float_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="hf-outliertune"):
        export_compressed_tensors(tiny_model("llama"), tmp_path)


def test_unsupported_compressed_tensors_version_is_refused_before_writing(monkeypatch, tmp_path):
    import compressed_tensors

    monkeypatch.setattr(compressed_tensors, "__version__", "0.20.0")
    out = tmp_path / "export"
    with pytest.raises(ImportError, match=r"0\.20\.0 is installed.*0\.17\.x"):
        export_compressed_tensors(_quantized("llama", **WO_OC), out)
    assert not out.exists()
