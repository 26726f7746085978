"""save_pretrained → from_pretrained of quantized models: bit-identical, calibration-free, safetensors only."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import FORMAT_VERSION, OutlierTuneLinear

from conftest import NUM_THREADS, logits_of, small_config
from tiny_models import ARCH_CONFIGS, tiny_model, tiny_tokenizer

_FRESH_PROCESS = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import hf_outliertune
from transformers import AutoModelForCausalLM
ckpt, ids_path, out_path = sys.argv[2:5]
model = AutoModelForCausalLM.from_pretrained(ckpt)
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_path), use_cache=False).logits
qc = model.config.quantization_config
torch.save({
    "logits": logits,
    "config_type": type(qc).__name__,
    "dataset": qc.dataset,
    "n_quantized": sum(isinstance(m, hf_outliertune.OutlierTuneLinear) for m in model.modules()),
    "weight_dtype": str(model.model.layers[0].self_attn.q_proj.weight.dtype),
}, out_path)
"""


def _reload_in_fresh_process(ckpt: str, ids: torch.Tensor, tmp_path) -> dict:
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(ids, ids_path)
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(NUM_THREADS), ckpt, ids_path, out_path],
        cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)


def test_reload_in_fresh_process_is_bit_identical(llama_ckpt, eval_ids, tmp_path):
    ckpt, logits = llama_ckpt
    out = _reload_in_fresh_process(ckpt, eval_ids, tmp_path)
    assert out["config_type"] == "OutlierTuneConfig"
    assert out["dataset"] is None  # nothing to calibrate on, and none needed
    assert out["n_quantized"] == 14
    assert out["weight_dtype"] == "torch.int8"
    assert torch.equal(out["logits"], logits)


def test_reload_in_process_is_bit_identical(llama_ckpt, eval_ids):
    ckpt, logits = llama_ckpt
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    assert model.config.quantization_config.dataset is None
    assert sum(isinstance(m, OutlierTuneLinear) for m in model.modules()) == 14
    assert torch.equal(logits_of(model, eval_ids), logits)


def test_only_safetensors_written(llama_ckpt):
    ckpt, _ = llama_ckpt
    files = sorted(os.listdir(ckpt))
    weights = [f for f in files if f.endswith(".safetensors")]
    assert weights, files
    for f in files:
        assert f.endswith((".safetensors", ".json")) or f == "README.md", f"unexpected file {f} in the checkpoint: {files}"
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files)


def test_config_json_describes_the_format(llama_ckpt):
    ckpt, _ = llama_ckpt
    with open(os.path.join(ckpt, "config.json"), encoding="utf-8") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "hf_outliertune"
    assert qc["format_version"] == FORMAT_VERSION
    assert qc["dataset"] is None and qc["tokenizer"] is None
    formats = qc["module_formats"]
    expected = {f"model.layers.{i}.{n}" for i in range(2) for n in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(formats) == expected
    for name, fmt in formats.items():
        assert {"act", "offset", "bias"} <= set(fmt), name
        static = name.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
        assert fmt["act"] == ("static" if static else "dynamic"), name
        assert fmt["offset"] is static, name  # bias-free RMSNorm: the shift is applied by input_offset
    assert qc["calibration_summary"]["tokens"] == 8 * 64
    # and the safetensors hold exactly the promised quantized tensors
    from safetensors import safe_open

    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_dtype() == "I8"
        assert f.get_slice("model.layers.0.mlp.down_proj.weight_scale").get_dtype() == "F32"
    for name, fmt in formats.items():
        assert f"{name}.weight" in keys and f"{name}.weight_scale" in keys
        assert (f"{name}.input_offset" in keys) == fmt["offset"]
        assert (f"{name}.bias" in keys) == fmt["bias"]


def test_sharded_checkpoint_reloads(llama_ckpt, eval_ids, tmp_path):
    ckpt, logits = llama_ckpt
    model = AutoModelForCausalLM.from_pretrained(ckpt)
    out = str(tmp_path / "sharded")
    model.save_pretrained(out, max_shard_size="100KB")
    shards = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    assert len(shards) > 1
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(out), eval_ids), logits)


def test_quantize_api_save_reload(eval_ids, tmp_path, tiny_dir):
    tok = tiny_tokenizer()
    model = tiny_model("opt")
    cfg = small_config(tokenizer=None)
    returned = hf_outliertune.quantize(model, cfg, tok)
    assert returned is model
    assert model.config.quantization_config is cfg
    assert cfg.tokenizer is tok and cfg.module_formats
    assert model.is_quantized
    n_quant = sum(isinstance(m, OutlierTuneLinear) for m in model.modules())
    assert n_quant == 12
    logits = logits_of(model, eval_ids)

    out = str(tmp_path / "api")
    model.save_pretrained(out)
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        qc = json.load(f)["quantization_config"]
    assert qc["quant_method"] == "hf_outliertune" and qc["tokenizer"] is None and len(qc["module_formats"]) == 12
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(logits_of(reloaded, eval_ids), logits)

    # the in-memory API leaves the model exactly as quantize-on-load does
    on_load = AutoModelForCausalLM.from_pretrained(tiny_dir("opt"), quantization_config=small_config(),
                                                   dtype=torch.float32)
    assert torch.equal(logits_of(on_load, eval_ids), logits)

    # quantizing a quantized model is refused
    with pytest.raises(ValueError, match="already carries a quantization_config"):
        hf_outliertune.quantize(reloaded, small_config(), tok)


def test_reload_with_excluded_linears(tiny_dir, eval_ids, tmp_path):
    """Excluded readers of a folded RMSNorm keep their (rewritten) float weights through a reload."""
    excluded = ["self_attn.k_proj", "mlp.up_proj"]
    model = AutoModelForCausalLM.from_pretrained(
        tiny_dir("llama"), quantization_config=small_config(modules_to_not_convert=excluded), dtype=torch.float32
    )
    logits = logits_of(model, eval_ids)
    model.save_pretrained(str(tmp_path / "q"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert type(reloaded.model.layers[0].self_attn.k_proj) is nn.Linear
    assert type(reloaded.model.layers[1].mlp.up_proj) is nn.Linear
    assert isinstance(reloaded.model.layers[0].self_attn.q_proj, OutlierTuneLinear)
    assert torch.equal(logits_of(reloaded, eval_ids), logits)


def test_reload_excluded_bias_free_reader_of_layernorm(eval_ids, tmp_path):
    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", **ARCH_CONFIGS["opt"], enable_bias=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.2)
    hf_outliertune.quantize(model, small_config(modules_to_not_convert=["self_attn.v_proj"]), tiny_tokenizer())
    logits = logits_of(model, eval_ids)
    model.save_pretrained(str(tmp_path / "q"))
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    assert torch.equal(logits_of(reloaded, eval_ids), logits)
