"""OutlierTuneConfig: defaults, validation, (de)serialisation and registration with transformers."""

from __future__ import annotations

import importlib
import json

import pytest
from transformers import AutoConfig
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    AutoQuantizationConfig,
)

import hf_outliertune
from hf_outliertune import config as config_module
from hf_outliertune import FORMAT_VERSION, QUANT_METHOD, OutlierTuneConfig, OutlierTuneHfQuantizer


def test_defaults_are_valid():
    cfg = OutlierTuneConfig()
    assert cfg.quant_method == QUANT_METHOD == "hf_outliertune"
    assert (cfg.weight_bits, cfg.act_bits) == (8, 8)
    assert cfg.activation_scheme == "outliertune"
    assert cfg.uses_static_activations
    # tunable defaults (they change as the method is tuned): only require allowed values
    assert cfg.weight_algorithm in config_module.WEIGHT_ALGORITHMS
    assert cfg.act_clip in config_module.ACT_CLIPS
    assert cfg.symmetrize is True
    assert cfg.format_version == FORMAT_VERSION
    assert cfg.module_formats is None and cfg.dataset is None and cfg.tokenizer is None
    cfg.post_init()  # re-validating the defaults must not raise
    assert not OutlierTuneConfig(activation_scheme="per_token").uses_static_activations
    assert not OutlierTuneConfig(activation_scheme="smoothquant").uses_static_activations


def _full_config(**overrides) -> OutlierTuneConfig:
    kwargs = dict(
        weight_bits=6,
        act_bits=6,
        symmetrize=False,
        activation_scheme="smoothquant",
        smoothquant_alpha=0.7,
        act_clip="max",
        weight_algorithm="mse",
        gptq_damp=0.05,
        num_samples=3,
        seq_len=17,
        calibration_batch_size=2,
        seed=5,
        modules_to_not_convert=["mlp.down_proj"],
        module_formats={"model.layers.0.mlp.up_proj": {"act": "static", "offset": True, "bias": False}},
        calibration_summary={"num_samples": 3, "seq_len": 17, "tokens": 51},
    )
    kwargs.update(overrides)
    return OutlierTuneConfig(**kwargs)


def test_to_dict_from_dict_round_trip():
    cfg = _full_config(dataset=["some text", "more text"], tokenizer=object())
    d = cfg.to_dict()
    # runtime-only objects are not serialised, everything else is
    assert d["dataset"] is None and d["tokenizer"] is None
    assert d["quant_method"] == "hf_outliertune"
    assert d["weight_bits"] == 6 and d["smoothquant_alpha"] == 0.7 and d["seed"] == 5
    assert d["module_formats"] == cfg.module_formats
    json.dumps(d)  # JSON-safe even though the config holds a tokenizer object

    back = OutlierTuneConfig.from_dict(d)
    assert isinstance(back, OutlierTuneConfig)
    assert back.to_dict() == d
    for key in ("weight_bits", "act_bits", "symmetrize", "activation_scheme", "smoothquant_alpha", "act_clip",
                "weight_algorithm", "gptq_damp", "num_samples", "seq_len", "calibration_batch_size", "seed",
                "modules_to_not_convert", "module_formats", "format_version", "calibration_summary"):
        assert getattr(back, key) == getattr(cfg, key), key

    # the same through the transformers entry point used when loading config.json
    auto = AutoQuantizationConfig.from_dict(json.loads(json.dumps(d)))
    assert type(auto) is OutlierTuneConfig
    assert auto.to_dict() == d


def test_to_dict_keeps_string_paths():
    cfg = OutlierTuneConfig(dataset="/data/calib.txt", tokenizer="org/some-tokenizer")
    d = cfg.to_dict()
    assert d["dataset"] == "/data/calib.txt"
    assert d["tokenizer"] == "org/some-tokenizer"
    back = OutlierTuneConfig.from_dict(d)
    assert back.dataset == "/data/calib.txt" and back.tokenizer == "org/some-tokenizer"


def test_to_dict_is_a_copy():
    cfg = _full_config()
    d = cfg.to_dict()
    d["module_formats"]["model.layers.0.mlp.up_proj"]["act"] = "dynamic"
    d["modules_to_not_convert"].append("x")
    assert cfg.module_formats["model.layers.0.mlp.up_proj"]["act"] == "static"
    assert cfg.modules_to_not_convert == ["mlp.down_proj"]


def test_repr_does_not_dump_module_formats():
    cfg = _full_config()
    r = repr(cfg)
    assert "module_formats=<1 modules>" in r
    assert "model.layers.0.mlp.up_proj" not in r


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(weight_bits=4), "weight_bits"),
        (dict(weight_bits=True), "weight_bits"),
        (dict(act_bits=7), "act_bits"),
        (dict(activation_scheme="x"), "activation_scheme"),
        (dict(act_clip="x"), "act_clip"),
        (dict(weight_algorithm="x"), "weight_algorithm"),
        (dict(num_samples=0), "num_samples"),
        (dict(num_samples=2.5), "num_samples"),
        (dict(num_samples=True), "num_samples"),
        (dict(seq_len=1), "seq_len"),
        (dict(calibration_batch_size=0), "calibration_batch_size"),
        (dict(seed=-1), "seed"),
        (dict(smoothquant_alpha=1.5), "smoothquant_alpha"),
        (dict(smoothquant_alpha=-0.1), "smoothquant_alpha"),
        (dict(smoothquant_alpha="0.5"), "smoothquant_alpha"),
        (dict(gptq_damp=0), "gptq_damp"),
        (dict(migration_alpha=2.0), "migration_alpha"),
        (dict(gptq_damp=1.0), "gptq_damp"),
        (dict(format_version=0), "format_version"),
        (dict(dataset=123), "dataset"),
        (dict(modules_to_not_convert=[1]), "modules_to_not_convert"),
        (dict(not_a_real_option=1), "not_a_real_option"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else None,
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        OutlierTuneConfig(**kwargs)
    assert field in str(info.value)


def test_invalid_value_through_from_dict():
    d = OutlierTuneConfig().to_dict()
    d["act_bits"] = 7
    with pytest.raises(ValueError, match="act_bits"):
        AutoQuantizationConfig.from_dict(d)


def test_newer_format_version_asks_to_upgrade():
    with pytest.raises(ValueError) as info:
        OutlierTuneConfig(format_version=FORMAT_VERSION + 1)
    msg = str(info.value)
    assert "upgrade" in msg.lower()
    assert str(FORMAT_VERSION + 1) in msg
    # the current version itself is accepted
    assert OutlierTuneConfig(format_version=FORMAT_VERSION).format_version == FORMAT_VERSION


def test_registration_idempotent():
    importlib.reload(hf_outliertune)
    hf_outliertune.register()
    hf_outliertune.register()
    assert AUTO_QUANTIZATION_CONFIG_MAPPING["hf_outliertune"] is OutlierTuneConfig
    assert AUTO_QUANTIZER_MAPPING["hf_outliertune"] is OutlierTuneHfQuantizer
    cfg = AutoQuantizationConfig.from_dict({"quant_method": "hf_outliertune", "weight_bits": 6})
    assert isinstance(cfg, OutlierTuneConfig) and cfg.weight_bits == 6


def test_config_survives_model_config_json():
    """A model config carrying the quantization config serialises it to JSON and back."""
    cfg = _full_config()
    model_cfg = AutoConfig.for_model("llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=64)
    model_cfg.quantization_config = cfg
    d = json.loads(model_cfg.to_json_string())
    assert d["quantization_config"]["quant_method"] == "hf_outliertune"
    assert d["quantization_config"]["module_formats"] == cfg.module_formats
    assert AutoQuantizationConfig.from_dict(d["quantization_config"]).to_dict() == cfg.to_dict()


@pytest.mark.parametrize("field,value", [("weight_bits", 8.0), ("act_bits", True), ("symmetrize", 1),
                                         ("rotate_dynamic", 0), ("gptq_quantized_inputs", "yes")])
def test_lookalike_types_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        OutlierTuneConfig(**{field: value})
