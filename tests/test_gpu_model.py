"""A quantized model on the GPU (skipped without CUDA): Triton kernels vs the reference path, and compile.

- Logits of a W8A8 model on CUDA (fused norm+quant, Triton GEMMs) equal the CPU reference path's within
  tolerance: fp32 model, relative error < 1e-3 (integer GEMMs are exact; the differences are fp32 reduction
  order in the norms and rare one-step rounding ties in the activation codes).
- `generate` with a static cache under `torch.compile(mode="reduce-overhead")` (CUDA graphs) gives the same
  greedy tokens as eager generation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import logits_of, rel_err, small_config

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


def test_generate_static_cache_compiled_matches_eager(cpu_model, eval_ids):
    model = copy.deepcopy(cpu_model).to("cuda")
    prompt = eval_ids[:1, :16].cuda()
    kwargs = dict(max_new_tokens=12, do_sample=False, cache_implementation="static")
    eager = model.generate(prompt, **kwargs)
    model.forward = torch.compile(model.forward, mode="reduce-overhead")
    compiled = model.generate(prompt, **kwargs)
    compiled_again = model.generate(prompt, **kwargs)  # replays the captured graphs
    assert torch.equal(eager, compiled) and torch.equal(eager, compiled_again)
