"""Every refusal path: bad calibration data, unsupported models, corrupt or edited checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import FORMAT_VERSION, OutlierTuneConfig
from hf_outliertune.architectures import ARCHITECTURES, UnsupportedArchitectureError
from hf_outliertune.calibration import CalibrationError
from hf_outliertune.checkpoint import CheckpointError
from hf_outliertune.pipeline import NoQuantizableLinearError

from conftest import small_config
from tiny_models import ARCH_CONFIGS, sample_text, tiny_model, tiny_tokenizer


def test_error_types_are_value_errors():
    for cls in (CalibrationError, CheckpointError, NoQuantizableLinearError, UnsupportedArchitectureError):
        assert issubclass(cls, ValueError)


# ---------------------------------------------------------------- calibration data


@pytest.mark.parametrize("dataset", [[], ["  "], ["", "\n\n\t"]], ids=["empty-list", "blank", "all-blank"])
def test_empty_dataset_refused_before_loading(dataset, tiny_dir):
    with pytest.raises(CalibrationError, match="dataset"):
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(dataset=dataset))


def test_missing_dataset_refused(tiny_dir):
    with pytest.raises(CalibrationError, match="calibration text"):
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(dataset=None))


def test_dataset_path_that_is_not_a_file(tiny_dir, tmp_path):
    with pytest.raises(CalibrationError, match="not a file"):
        AutoModelForCausalLM.from_pretrained(
            tiny_dir("llama"), quantization_config=small_config(dataset=str(tmp_path / "missing.txt"))
        )


def test_dataset_with_non_strings():
    with pytest.raises(CalibrationError, match="strings"):
        hf_outliertune.quantize(tiny_model("llama"), small_config(dataset=["ok text", 3]), tiny_tokenizer())


def test_dataset_file_path_works(tmp_path):
    """The positive counterpart: a path to a text file is a valid dataset."""
    path = tmp_path / "calib.txt"
    path.write_text(sample_text(40_000), encoding="utf-8")
    model = tiny_model("llama")
    hf_outliertune.quantize(model, small_config(dataset=str(path), num_samples=4, seq_len=32), tiny_tokenizer())
    assert model.config.quantization_config.to_dict()["dataset"] == str(path)


def test_text_too_short_names_token_counts():
    tok = tiny_tokenizer()
    text = "the quick brown fox jumps over the lazy dog " * 3
    n_tokens = tok(text, add_special_tokens=False, return_tensors="pt").input_ids.numel()
    cfg = small_config(dataset=[text], num_samples=8, seq_len=64)
    with pytest.raises(CalibrationError) as info:
        hf_outliertune.quantize(tiny_model("llama"), cfg, tok)
    msg = str(info.value)
    assert f"{n_tokens} tokens" in msg
    assert "num_samples=8" in msg and "seq_len=64" in msg and str(8 * 64) in msg


def test_calibration_windows_boundary():
    """num_samples × seq_len tokens exactly is enough (boundary of the check above)."""
    tok = tiny_tokenizer()
    ids = tok(sample_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    from hf_outliertune.calibration import calibration_windows

    windows = calibration_windows([sample_text()], tok, num_samples=3, seq_len=16)
    assert windows.shape == (3, 16)
    # windows are distinct, aligned, non-overlapping slices of the tokenized text
    aligned = ids[: ids.numel() // 16 * 16].view(-1, 16)
    matches = [(aligned == w).all(dim=1).nonzero().flatten().tolist() for w in windows]
    assert all(matches), "each window must be an aligned slice of the text"
    assert len({m[0] for m in matches}) == 3
    exact = tok.decode(ids[: 4 * 16])
    n = tok(exact, add_special_tokens=False, return_tensors="pt").input_ids.numel()
    assert calibration_windows([exact], tok, num_samples=n // 16, seq_len=16).shape == (n // 16, 16)
    with pytest.raises(CalibrationError):
        calibration_windows([exact], tok, num_samples=n // 16 + 1, seq_len=16)


def test_everything_excluded_raises(tiny_dir):
    excluded = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    with pytest.raises(NoQuantizableLinearError, match="modules_to_not_convert"):
        AutoModelForCausalLM.from_pretrained(
            tiny_dir("llama"), quantization_config=small_config(modules_to_not_convert=excluded)
        )
    with pytest.raises(NoQuantizableLinearError):
        hf_outliertune.quantize(tiny_model("llama"), small_config(modules_to_not_convert=["model.layers"]),
                                tiny_tokenizer())


@pytest.mark.parametrize("where", ["norm", "linear", "embedding"])
def test_nan_weights_raise(where):
    model = tiny_model("llama")
    with torch.no_grad():
        if where == "norm":
            model.model.layers[0].input_layernorm.weight[5] = float("nan")
        elif where == "linear":
            model.model.layers[1].mlp.down_proj.weight[3, 7] = float("nan")
        else:
            model.model.embed_tokens.weight[:, 2] = float("inf")
    with pytest.raises(CalibrationError, match="NaN"):
        hf_outliertune.quantize(model, small_config(num_samples=4, seq_len=32), tiny_tokenizer())


# ---------------------------------------------------------------- unsupported models


def _save_from_config(path, model_type, **kwargs) -> str:
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **kwargs)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return str(path)


def test_unknown_architecture_lists_supported(tmp_path):
    path = _save_from_config(tmp_path / "gpt2", "gpt2", vocab_size=512, n_embd=32, n_layer=1, n_head=2,
                             n_positions=128, bos_token_id=1, eos_token_id=2)
    with pytest.raises(UnsupportedArchitectureError) as info:
        AutoModelForCausalLM.from_pretrained(path, quantization_config=small_config())
    msg = str(info.value)
    assert "gpt2" in msg
    for model_type in ARCHITECTURES:
        assert model_type in msg


def test_supported_type_with_unexpected_layout(tmp_path):
    """A supported model_type whose blocks miss an expected submodule is refused, not half-quantized."""
    model = tiny_model("llama")
    del model.model.layers[1].mlp.up_proj
    with pytest.raises(UnsupportedArchitectureError, match="up_proj"):
        hf_outliertune.quantize(model, small_config(), tiny_tokenizer())


def test_opt_post_norm_refused(tmp_path):
    path = _save_from_config(tmp_path / "opt350", "opt", **ARCH_CONFIGS["opt"], do_layer_norm_before=False)
    with pytest.raises(UnsupportedArchitectureError, match="do_layer_norm_before"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=small_config())


def test_disk_offload_refused(tiny_dir):
    with pytest.raises(ValueError, match="does not support disk offload"):
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(),
                                             device_map={"": "disk"})


# ---------------------------------------------------------------- corrupt / edited checkpoints


@pytest.fixture
def ckpt_copy(llama_ckpt, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(llama_ckpt[0], dst)
    return str(dst)


def _rewrite_tensors(ckpt: str, edit) -> None:
    path = os.path.join(ckpt, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_quant_config(ckpt: str, edit) -> None:
    path = os.path.join(ckpt, "config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    edit(config["quantization_config"])
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f)


def test_unmodified_copy_loads(ckpt_copy):
    """Control for the corruption tests below: the pristine copy loads."""
    model = AutoModelForCausalLM.from_pretrained(ckpt_copy)
    assert isinstance(model.model.layers[0].self_attn.q_proj, hf_outliertune.OutlierTuneLinear)


def test_missing_weight_scale(ckpt_copy):
    _rewrite_tensors(ckpt_copy, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight_scale"))
    with pytest.raises(CheckpointError, match="missing model.layers.1.self_attn.q_proj.weight_scale"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_missing_input_offset(ckpt_copy):
    _rewrite_tensors(ckpt_copy, lambda t: t.pop("model.layers.0.mlp.gate_proj.input_offset"))
    with pytest.raises(CheckpointError, match="missing"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_wrong_shape(ckpt_copy):
    def edit(t):
        key = "model.layers.0.mlp.down_proj.weight"
        t[key] = t[key][:, :-1].contiguous()

    _rewrite_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match=r"down_proj.weight has shape \[64, 127\], expected \[64, 128\]"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_wrong_dtype(ckpt_copy):
    def edit(t):
        key = "model.layers.0.self_attn.o_proj.weight"
        t[key] = t[key].float()

    _rewrite_tensors(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match="o_proj.weight has dtype F32"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_truncated_file(ckpt_copy):
    path = os.path.join(ckpt_copy, "model.safetensors")
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_newer_format_version_asks_to_upgrade(ckpt_copy):
    _edit_quant_config(ckpt_copy, lambda qc: qc.update(format_version=FORMAT_VERSION + 1))
    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(ckpt_copy)
    assert "upgrade" in str(info.value).lower()


@pytest.mark.parametrize("name", ["model.layers.7.self_attn.q_proj", "model.layers.0.self_attn.qkv_proj",
                                  "model.norm"])
def test_module_formats_naming_a_non_linear(ckpt_copy, name):
    _edit_quant_config(ckpt_copy, lambda qc: qc["module_formats"].update(
        {name: {"act": "dynamic", "offset": False, "bias": False}}))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_empty_module_formats(ckpt_copy):
    _edit_quant_config(ckpt_copy, lambda qc: qc.update(module_formats={}))
    with pytest.raises(CheckpointError, match="module_formats"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_module_formats_promising_an_absent_tensor(ckpt_copy):
    """The config says down_proj has an input_offset, the file has none: refused, not silently zero-filled."""
    def edit(qc):
        qc["module_formats"]["model.layers.0.mlp.down_proj"] = {"act": "static", "offset": True, "bias": False}

    _edit_quant_config(ckpt_copy, edit)
    with pytest.raises(CheckpointError, match="missing model.layers.0.mlp.down_proj.input_offset"):
        AutoModelForCausalLM.from_pretrained(ckpt_copy)


def test_format_version_newer_in_config_object_is_refused():
    with pytest.raises(ValueError, match="pip install -U hf-outliertune"):
        OutlierTuneConfig.from_dict({"quant_method": "hf_outliertune", "format_version": FORMAT_VERSION + 5})


def test_module_formats_entry_without_act(ckpt_copy):
    _edit_quant_config(ckpt_copy, lambda qc: qc["module_formats"].update(
        {"model.layers.0.mlp.down_proj": {"offset": False, "bias": False}}))
    try:
        AutoModelForCausalLM.from_pretrained(ckpt_copy)
    except CheckpointError as err:
        assert "model.layers.0.mlp.down_proj" in str(err)
    except Exception as err:  # noqa: BLE001 - the bug: any other error type
        raise AssertionError(f"expected CheckpointError, got {type(err).__name__}: {err}") from err
    else:
        raise AssertionError("a malformed module_formats entry was accepted")
