"""AdaDim weight-only mode end to end on tiny models: quantize on load, accuracy, save/reload bit-exact, format checks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import FORMAT_VERSION
from hf_outliertune.calibration import CalibrationError
from hf_outliertune.checkpoint import CheckpointError
from hf_outliertune.cli import main
from hf_outliertune.weight_only_linear import WeightOnlyLinear

from conftest import NUM_THREADS, logits_of, rel_err, small_config
from tiny_models import sample_text, save_tiny, tiny_tokenizer


_FRESH_PROCESS = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import hf_outliertune
from transformers import AutoModelForCausalLM
from hf_outliertune.weight_only_linear import WeightOnlyLinear
ckpt, ids_path, out_path = sys.argv[2:5]
model = AutoModelForCausalLM.from_pretrained(ckpt)
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_path), use_cache=False).logits
qc = model.config.quantization_config
torch.save({"logits": logits, "config_type": type(qc).__name__, "dataset": qc.dataset,
            "n_quantized": sum(isinstance(m, WeightOnlyLinear) for m in model.modules())}, out_path)
"""


def _reload_in_fresh_process(ckpt: str, ids: torch.Tensor, tmp_path) -> dict:
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(ids, ids_path)
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run([sys.executable, "-c", _FRESH_PROCESS, str(NUM_THREADS), ckpt, ids_path, out_path],
                          cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)


def wo_config(**overrides) -> hf_outliertune.OutlierTuneConfig:
    """A fast weight-only calibration config for the tiny models (W4 g16, GPTQ, adaptive layouts)."""
    kwargs = dict(act_bits=None, weight_bits=4, group_size=16, group_dim="adaptive", weight_algorithm="gptq",
                  gptq_damp=0.01)
    kwargs.update(overrides)
    return small_config(**kwargs)


def _n_weight_only(model: nn.Module) -> int:
    return sum(isinstance(m, WeightOnlyLinear) for m in model.modules())


@pytest.fixture(scope="module")
def float_logits(tiny_dir, eval_ids):
    cache: dict[str, torch.Tensor] = {}

    def get(arch: str) -> torch.Tensor:
        if arch not in cache:
            model = AutoModelForCausalLM.from_pretrained(tiny_dir(arch), dtype=torch.float32)
            cache[arch] = logits_of(model, eval_ids)
        return cache[arch]

    return get


# Relative logit error of the quantized tiny models (random weights, 2 blocks). Measured: W8 0.002-0.010,
# W4 g16 GPTQ-adaptive 0.007-0.09 (gemma3 highest: its random norms amplify); bounds leave ~2x headroom.
@pytest.mark.parametrize(
    "arch, bits, bound",
    [("llama", 8, 0.03), *[(arch, 4, 0.2) for arch in ("llama", "qwen2", "opt", "gemma")]],
)
def test_quantize_on_load_and_reload_bit_exact(arch, bits, bound, tiny_dir, eval_ids, float_logits, tmp_path):
    algorithm = "rtn" if bits == 8 else "gptq"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir(arch), quantization_config=wo_config(weight_bits=bits, weight_algorithm=algorithm), dtype=torch.float32
    )
    n = _n_weight_only(model)
    assert n == (12 if arch == "opt" else 14)
    assert not any(type(m) is nn.Linear for name, m in model.named_modules() if ".layers." in name)
    logits = logits_of(model, eval_ids)
    assert rel_err(float_logits(arch), logits) < bound
    model.save_pretrained(str(tmp_path))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert _n_weight_only(reloaded) == n
    assert torch.equal(logits_of(reloaded, eval_ids), logits)
    for name, module in model.named_modules():
        if isinstance(module, WeightOnlyLinear):
            twin = reloaded.get_submodule(name)
            assert twin.group_dim == module.group_dim and torch.equal(twin.qweight, module.qweight)


@pytest.fixture(scope="module")
def w3_ckpt(tiny_dir, tmp_path_factory) -> str:
    """A tiny Llama quantized on load to W3 g16 GPTQ-adaptive and saved."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=wo_config(weight_bits=3),
                                                 dtype=torch.float32)
    out = str(tmp_path_factory.mktemp("llama_w3"))
    model.save_pretrained(out)
    return out


def test_adaptive_choice_matches_its_recorded_criterion(w3_ckpt):
    model = AutoModelForCausalLM.from_pretrained(w3_ckpt)
    formats = model.config.quantization_config.module_formats
    outputs = set()
    for name, fmt in formats.items():
        crit = fmt["criterion"]
        assert fmt["group_dim"] == ("ic" if crit["ic"] < crit["oc"] else "oc"), name
        assert model.get_submodule(name).group_dim == fmt["group_dim"]
        outputs.add((name.rsplit(".", 1)[-1], crit["output"]))
    assert outputs == {("q_proj", "self_attn module"), ("k_proj", "self_attn module"), ("v_proj", "self_attn module"),
                       ("o_proj", "layer"), ("gate_proj", "mlp module"), ("up_proj", "mlp module"),
                       ("down_proj", "layer")}


def test_fixed_layouts_and_ragged_groups_reload_in_fresh_process(tmp_path, eval_ids):
    """hidden 48 = 32 + 16 and kv width 16 < 32: every group layout has a ragged or partial last group."""
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=512, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                  num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    ref = logits_of(model, eval_ids)
    cfg = wo_config(weight_bits=3, group_size=32, group_dim="ic", weight_clip="mse", act_order=False)
    hf_outliertune.quantize(model, cfg, tiny_tokenizer())
    logits = logits_of(model, eval_ids)
    assert rel_err(ref, logits) < 0.2
    k_proj = model.model.layers[0].self_attn.k_proj
    assert k_proj.weight_scale.shape == (1, 48) and k_proj.qweight.shape == (16, 3 * 2)
    ckpt = str(tmp_path / "ckpt")
    model.save_pretrained(ckpt)
    out = _reload_in_fresh_process(ckpt, eval_ids, tmp_path)
    assert out["config_type"] == "OutlierTuneConfig" and out["dataset"] is None and out["n_quantized"] == 14
    assert torch.equal(out["logits"], logits)


def test_checkpoint_holds_the_documented_tensors(w3_ckpt):
    ckpt = w3_ckpt
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["format_version"] == FORMAT_VERSION == 3
    assert qc["act_bits"] is None and qc["weight_bits"] == 3 and qc["group_dim"] == "adaptive"
    assert len(qc["module_formats"]) == 14
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        for name, fmt in qc["module_formats"].items():
            assert fmt["act"] == "none" and fmt["bits"] == 3 and fmt["group_size"] == 16
            n, k = {"k_proj": (32, 64), "v_proj": (32, 64), "gate_proj": (128, 64), "up_proj": (128, 64),
                    "down_proj": (64, 128)}.get(name.rsplit(".", 1)[-1], (64, 64))
            params = (n, k // 16) if fmt["group_dim"] == "oc" else (n // 16, k)
            q = f.get_slice(f"{name}.qweight")
            assert (q.get_dtype(), tuple(q.get_shape())) == ("I32", (n, 3 * (k // 32)))
            for suffix in ("weight_scale", "weight_zero"):
                t = f.get_slice(f"{name}.{suffix}")
                assert (t.get_dtype(), tuple(t.get_shape())) == ("F16", params)
            assert f"{name}.weight" not in keys and f"{name}.bias" not in keys


def test_corrupt_weight_only_checkpoints_are_refused(w3_ckpt, tmp_path):
    ckpt = w3_ckpt
    bad = str(tmp_path / "bad_shape")
    shutil.copytree(ckpt, bad)
    tensors = load_file(os.path.join(bad, "model.safetensors"))
    key = "model.layers.0.mlp.up_proj.qweight"
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="up_proj.qweight has shape"):
        AutoModelForCausalLM.from_pretrained(bad)

    bad = str(tmp_path / "bad_format")
    shutil.copytree(ckpt, bad)
    path = os.path.join(bad, "config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["quantization_config"]["module_formats"]["model.layers.1.self_attn.q_proj"]["group_dim"] = "row"
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f)
    with pytest.raises(CheckpointError, match="not a valid weight-only format"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_excluded_linears_stay_float(tiny_dir, eval_ids):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), quantization_config=wo_config(modules_to_not_convert=["mlp.down_proj"]), dtype=torch.float32
    )
    assert type(model.model.layers[0].mlp.down_proj) is nn.Linear
    assert _n_weight_only(model) == 12


def test_input_gradient_flows_through_the_quantized_layer(w3_ckpt):
    ckpt = w3_ckpt
    layer = AutoModelForCausalLM.from_pretrained(ckpt).model.layers[0].mlp.down_proj
    x = torch.randn(3, 5, layer.in_features, requires_grad=True)
    y = layer(x)
    grad = torch.randn_like(y)
    y.backward(grad)
    w = layer.effective_weight()
    torch.testing.assert_close(y, x @ w.t())
    torch.testing.assert_close(x.grad, grad @ w)
    assert layer.qweight.grad is None and not layer.qweight.requires_grad


def test_cli_weight_only(tmp_path, capsys):
    model = save_tiny("llama", str(tmp_path / "tiny"))
    text = tmp_path / "calib.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    out, report = tmp_path / "out", tmp_path / "report.json"
    code = main(["quantize", "--model", model, "--calib", str(text), "--num-samples", "4", "--seq-len", "32",
                 "--act-bits", "none", "--weight-bits", "3", "--group-size", "16", "--group-dim", "adaptive",
                 "--algorithm", "gptq", "--output", str(out), "--json", str(report)])
    assert code == 0
    figures = json.loads(report.read_text())
    assert figures["setting"] == "W3 g16 adaptive (gptq, mse clip, refit x2)"
    assert figures["config"]["act_bits"] is None and figures["config"]["group_size"] == 16
    assert _n_weight_only(AutoModelForCausalLM.from_pretrained(str(out))) == 14
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "--model", model, "--calib", str(text), "--weight-bits", "3"])
    assert exc.value.code == 2 and "--act-bits none" in capsys.readouterr().err


def test_fixed_layout_rtn_needs_no_calibration_data(tiny_dir, eval_ids, float_logits):
    cfg = hf_outliertune.OutlierTuneConfig(act_bits=None, weight_bits=8, weight_algorithm="rtn", group_size=16,
                                           group_dim="ic", weight_clip="minmax")
    assert not cfg.needs_calibration
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=cfg, dtype=torch.float32)
    assert _n_weight_only(model) == 14 and cfg.calibration_summary is None
    assert rel_err(float_logits("llama"), logits_of(model, eval_ids)) < 0.03
    for needs_data in (dict(group_dim="adaptive"), dict(weight_clip="mse"), dict(weight_algorithm="gptq")):
        kwargs = {**dict(act_bits=None, weight_bits=4, weight_algorithm="rtn", group_dim="oc", weight_clip="minmax"),
                  **needs_data}
        cfg = hf_outliertune.OutlierTuneConfig(**kwargs)
        with pytest.raises(CalibrationError, match="calibration text"):
            AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=cfg)


def test_refit_rounds_reach_the_stored_grids(tiny_dir, eval_ids, float_logits):
    """refit_rounds=0 stores min-max grids (integer zero points); the default refit stores fractional ones and,
    on this model, logits closer to the float model's."""
    errors = {}
    for rounds in (0, 2):
        model = AutoModelForCausalLM.from_pretrained(
            tiny_dir("llama"), quantization_config=wo_config(weight_bits=3, refit_rounds=rounds), dtype=torch.float32
        )
        assert model.config.quantization_config.refit_rounds == rounds
        zeros = torch.cat([m.weight_zero.float().flatten() for m in model.modules() if isinstance(m, WeightOnlyLinear)])
        assert torch.equal(zeros, zeros.round()) == (rounds == 0)
        errors[rounds] = rel_err(float_logits("llama"), logits_of(model, eval_ids))
    assert errors[2] < errors[0], errors
