"""A quantized model on the GPU (skipped without CUDA): Triton kernels vs the reference path, and compile.

- Logits of a W8A8 model on CUDA (fused norm+quant, Triton GEMMs) equal the CPU reference path's within
  tolerance: fp32 model, relative error < 1e-3 (integer GEMMs are exact; the differences are fp32 reduction
  order in the norms and rare one-step rounding ties in the activation codes).
- `generate` with a static cache under `torch.compile(mode="reduce-overhead")` (CUDA graphs) gives the same
  greedy tokens as eager generation.
- A saved pre-quantized checkpoint (W8A8 and AdaDim weight-only) loads with `device_map="auto"` onto the GPU,
  without calibration data, and gives the CPU reference logits (the Hub pull path after the download).
- An AdaDim model on CUDA (fused low-bit kernels) gives the CPU reference logits; so does a model with quantized
  embedding tables (`embedding_bits`, tied head through the low-bit kernel).
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import logits_of, rel_err, small_config

from hf_outliertune.weight_only_linear import WeightOnlyLinear

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def cpu_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(),
                                                dtype=torch.float32)


def test_cuda_logits_match_reference_path(cpu_model, eval_ids):
    ref = logits_of(cpu_model, eval_ids)
    gpu = copy.deepcopy(cpu_model).to("cuda")
    got = logits_of(gpu, eval_ids.cuda()).cpu()
    assert rel_err(ref, got) < 1e-3


def test_bf16_cuda_logits_close_to_fp32_reference(cpu_model, eval_ids):
    ref = logits_of(cpu_model, eval_ids)
    gpu = copy.deepcopy(cpu_model).to("cuda", torch.bfloat16)
    got = logits_of(gpu, eval_ids.cuda()).float().cpu()
    assert rel_err(ref, got) < 0.05


@pytest.fixture(scope="module")
def cpu_weight_only_model(tiny_dir):
    cfg = small_config(act_bits=None, weight_bits=4, group_size=16, group_dim="adaptive", weight_algorithm="gptq",
                       gptq_damp=0.01)
    return AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=cfg, dtype=torch.float32)


def test_weight_only_cuda_logits_match_reference_path(cpu_weight_only_model, eval_ids):
    ref = logits_of(cpu_weight_only_model, eval_ids)
    gpu = copy.deepcopy(cpu_weight_only_model).to("cuda")
    got = logits_of(gpu, eval_ids.cuda()).cpu()
    assert rel_err(ref, got) < 1e-4  # fp32 dequantization in both; only the reduction order differs


@pytest.fixture(scope="module")
def cpu_tables_model(tiny_dir):
    """Gemma (tied, scaled embeddings) W8A8 with 8-bit tables: a QuantizedEmbedding and a TiedQuantizedHead."""
    return AutoModelForCausalLM.from_pretrained(tiny_dir("gemma"), quantization_config=small_config(embedding_bits=8),
                                                dtype=torch.float32)


@pytest.fixture(scope="module")
def models(cpu_model, cpu_weight_only_model, cpu_tables_model):
    return {"w8a8": cpu_model, "weight_only": cpu_weight_only_model, "tables": cpu_tables_model}


def test_quantized_tables_cuda_logits_match_reference_path(cpu_tables_model, eval_ids):
    ref = logits_of(cpu_tables_model, eval_ids)
    gpu = copy.deepcopy(cpu_tables_model).to("cuda")
    assert gpu.get_output_embeddings().embedding is gpu.get_input_embeddings()
    assert gpu.get_input_embeddings().qweight.is_cuda
    got = logits_of(gpu, eval_ids.cuda()).cpu()
    assert rel_err(ref, got) < 1e-3


@pytest.mark.parametrize("which", ["w8a8", "weight_only", "tables"])
def test_generate_static_cache_compiled_matches_eager(which, models, eval_ids):
    """`generate` compiles the forward itself (static cache on CUDA, `is_compileable` quantizer); its CUDA
    graphs replay the quantized layers' custom ops."""
    from torch._dynamo.utils import counters

    model = copy.deepcopy(models[which]).to("cuda")
    prompt = eval_ids[:1, :16].cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, cache_implementation="static")
    eager = model.generate(prompt, disable_compile=True, **kwargs)
    torch._dynamo.reset()
    counters.clear()
    compiled = model.generate(prompt, **kwargs)
    compiled_again = model.generate(prompt, **kwargs)  # replays the captured graphs
    assert counters["stats"]["unique_graphs"] >= 1, "generate did not compile the quantized model's forward"
    assert torch.equal(eager, compiled) and torch.equal(eager, compiled_again)


@pytest.mark.parametrize("which", ["w8a8", "weight_only", "tables"])
def test_pre_quantized_checkpoint_loads_with_device_map_auto(which, models, eval_ids, tmp_path):
    model = models[which]
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, device_map="auto", dtype=torch.float32)
    assert {p.device.type for p in loaded.parameters()} == {"cuda"}
    if which == "weight_only":
        assert any(isinstance(m, WeightOnlyLinear) for m in loaded.modules())
    got = logits_of(loaded, eval_ids.cuda()).cpu()
    assert rel_err(logits_of(model, eval_ids), got) < 1e-3
