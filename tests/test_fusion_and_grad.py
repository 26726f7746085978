"""Norm+quantize fusion (inference) and the straight-through input gradient (training) of quantized models."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_outliertune import OutlierTuneLinear
from hf_outliertune.fusion import fuse_activation_quant, fuse_gated_mlp_quant, unfuse_activation_quant

from conftest import logits_of, rel_err, small_config

ARCHS = ["llama", "gemma3_text", "opt"]  # RMSNorm, Gemma's (1 + w) RMSNorm, LayerNorm with bias


@pytest.fixture(scope="module")
def quantized_models(tiny_dir):
    cache = {}

    def get(arch):
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(
                tiny_dir(arch), quantization_config=small_config(), dtype=torch.float32
            )
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_fused_norms_emit_codes_and_match_unfused_logits(arch, quantized_models, eval_ids):
    model = quantized_models(arch)
    fused_logits = logits_of(model, eval_ids)
    fused = [m for m in model.modules() if "_outliertune_fusion" in m.__dict__]
    norms = [m for m in fused if "Norm" in type(m).__name__]
    mlps = [m for m in fused if "MLP" in type(m).__name__]
    assert len(norms) == 2 * model.config.num_hidden_layers  # every attention and MLP input norm
    # SiLU-gated MLPs fuse their down_proj's quantizer; Gemma's GELU gate and OPT's ungated MLP do not
    assert len(mlps) == (model.config.num_hidden_layers if arch == "llama" else 0)
    assert len(fused) == len(norms) + len(mlps)
    with torch.no_grad():
        out = norms[0](torch.randn(2, 5, model.config.hidden_size))
    assert out.dtype == torch.int8
    assert unfuse_activation_quant(model) == len(fused)
    unfused_logits = logits_of(model, eval_ids)
    assert fuse_activation_quant(model) == len(fused)
    # fused: norm and shift in fp32 straight to codes, silu(gate) · up in fp32; unfused: the float outputs (fp32
    # here), then round. Same math.
    assert rel_err(unfused_logits, fused_logits) < 1e-5


def test_fused_mlp_falls_back_where_it_cannot_serve(quantized_models, eval_ids):
    """With autograd on, or once down_proj is wrapped (a LoRA adapter), the MLP runs its original forward."""
    model = quantized_models("llama")
    mlp = model.model.layers[0].mlp
    assert "_outliertune_fusion" in mlp.__dict__ and fuse_gated_mlp_quant(model) == 0  # already fused: no-op
    x = torch.randn(2, 3, model.config.hidden_size)
    with torch.no_grad():
        fused = mlp(x)
        original = mlp._outliertune_fusion.original_forward(x)
    assert rel_err(original, fused) < 1e-5
    down = mlp.down_proj
    calls = []
    mlp.down_proj = torch.nn.Sequential(down)  # any wrapper: not an OutlierTuneLinear
    mlp.down_proj.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            assert rel_err(original, mlp(x)) < 1e-5
        assert calls == [1]  # the wrapper ran: the original forward served
    finally:
        mlp.down_proj = down


def test_fusion_skips_norms_with_float_readers(tiny_dir):
    cfg = small_config(modules_to_not_convert=["model.layers.0.self_attn.k_proj"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=cfg, dtype=torch.float32)
    fused = {n for n, m in model.named_modules() if "_outliertune_fusion" in m.__dict__}
    assert "model.layers.0.input_layernorm" not in fused
    assert "model.layers.0.post_attention_layernorm" in fused and "model.layers.1.input_layernorm" in fused


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_grad_flows_to_inputs_straight_through(arch, quantized_models, eval_ids):
    """With autograd on, norms run in float and every quantized linear passes grad_y · W_eff to its input."""
    model = quantized_models(arch)
    emb = model.get_input_embeddings()(eval_ids[:1, :32]).detach().requires_grad_(True)
    loss = model(inputs_embeds=emb, labels=eval_ids[:1, :32]).loss
    loss.backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    qlinears = [m for m in model.modules() if isinstance(m, OutlierTuneLinear)]
    assert qlinears and all(m.weight.grad is None and not m.weight.requires_grad for m in qlinears)
    norm = model.model.decoder.layers[0].self_attn_layer_norm if arch == "opt" else model.model.layers[0].input_layernorm
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0  # float path: gradients reach the norm
    model.zero_grad(set_to_none=True)


def test_straight_through_gradient_is_the_effective_weight():
    torch.manual_seed(0)
    for mode, offset, block in (("static", True, 1), ("dynamic", False, 16)):
        lin = OutlierTuneLinear(32, 8, bias=True, act_mode=mode, has_input_offset=offset, weight_bits=8, act_bits=8,
                                hadamard_block=block)
        lin.weight.data = torch.randint(-127, 128, (8, 32), dtype=torch.int8)
        lin.weight_scale.copy_(torch.rand(8) * 0.01)
        lin.bias.data.normal_()
        if offset:
            lin.input_offset.normal_()
        x = (torch.randn(3, 32) * 20).requires_grad_(True)
        y = lin(x)
        with torch.no_grad():
            assert torch.equal(y, lin(x))  # the autograd path computes the same quantized forward
        g = torch.randn_like(y)
        y.backward(g)
        torch.testing.assert_close(x.grad, g @ lin.effective_weight())
        # W_eff is the float map the quantized layer approximates
        approx = (x.detach() - (lin.input_offset if offset else 0)) @ lin.effective_weight().T + lin.bias
        assert rel_err(approx, y.detach()) < 0.03  # rounding error of the inputs and weights only


def test_float_input_recovers_what_the_layer_quantizes():
    lin = OutlierTuneLinear(4, 2, bias=False, act_mode="static", has_input_offset=True, weight_bits=8, act_bits=8)
    lin.input_offset.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
    codes = torch.tensor([[1, 2, -3, 4]], dtype=torch.int8)
    torch.testing.assert_close(lin.float_input(codes), torch.tensor([[1.5, 1.0, -3.0, 6.0]]))
    x = torch.randn(1, 4)
    assert lin.float_input(x) is x
