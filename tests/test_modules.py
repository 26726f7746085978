"""OutlierTuneLinear against hand-written float computations, and the int8 GEMM reference kernel."""

from __future__ import annotations

import importlib

import pytest
import torch

import hf_outliertune
from hf_outliertune import OutlierTuneLinear
from hf_outliertune.kernels import int8_matmul, int8_matmul_reference

from conftest import logits_of, rel_err, small_config
from tiny_models import tiny_model, tiny_tokenizer

kernel_module = importlib.import_module("hf_outliertune.kernels.int8_matmul")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _make_linear(in_f=13, out_f=7, act_mode="static", offset=False, bias=True, wbits=8, abits=8, seed=0):
    g = _gen(seed)
    lin = OutlierTuneLinear(in_f, out_f, bias=bias, act_mode=act_mode, has_input_offset=offset,
                            weight_bits=wbits, act_bits=abits)
    q = 2 ** (wbits - 1) - 1
    with torch.no_grad():
        lin.weight.copy_(torch.randint(-q, q + 1, (out_f, in_f), generator=g, dtype=torch.int8))
        lin.weight_scale.copy_(torch.rand(out_f, generator=g) * 0.02 + 1e-3)
        if bias:
            lin.bias.copy_(torch.randn(out_f, generator=g))
        if offset:
            lin.input_offset.copy_(torch.randn(in_f, generator=g) * 5)
    return lin


def _hand_static(lin: OutlierTuneLinear, x: torch.Tensor) -> torch.Tensor:
    q = 2 ** (lin.act_bits - 1) - 1
    xs = x.reshape(-1, lin.in_features).float()
    if lin.input_offset is not None:
        xs = xs - lin.input_offset
    codes = torch.clamp(torch.round(xs), -q, q)
    y = (codes @ lin.weight.float().T) * lin.weight_scale
    if lin.bias is not None:
        y = y + lin.bias
    return y.reshape(*x.shape[:-1], lin.out_features)


def _hand_dynamic(lin: OutlierTuneLinear, x: torch.Tensor) -> torch.Tensor:
    q = 2 ** (lin.act_bits - 1) - 1
    xs = x.reshape(-1, lin.in_features).float()
    step = xs.abs().amax(dim=1, keepdim=True) / q
    codes = torch.clamp(torch.round(xs / step), -q, q)
    y = (codes @ lin.weight.float().T) * lin.weight_scale * step
    if lin.bias is not None:
        y = y + lin.bias
    return y.reshape(*x.shape[:-1], lin.out_features)


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_static_forward_matches_hand_computation(offset, bias):
    lin = _make_linear(offset=offset, bias=bias)
    x = torch.randn(2, 5, 13, generator=_gen(1)) * 60  # grid units: some values beyond ±127 get clamped
    y = lin(x)
    assert y.shape == (2, 5, 7) and y.dtype == torch.float32
    torch.testing.assert_close(y, _hand_static(lin, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_dynamic_forward_matches_hand_computation(bias):
    lin = _make_linear(act_mode="dynamic", bias=bias)
    x = torch.randn(3, 4, 13, generator=_gen(2)) * torch.logspace(-2, 2, 4)[None, :, None]
    y = lin(x)
    assert y.shape == (3, 4, 7)
    torch.testing.assert_close(y, _hand_dynamic(lin, x), rtol=1e-5, atol=1e-5)


def test_dynamic_forward_approximates_float_linear():
    """Dynamic W8A8 of a real float weight: error consistent with two 8-bit grids (≈1%), not larger."""
    g = _gen(3)
    w = torch.randn(24, 48, generator=g) * 0.1
    b = torch.randn(24, generator=g)
    scale = w.abs().amax(1) / 127
    lin = OutlierTuneLinear(48, 24, bias=True, act_mode="dynamic", has_input_offset=False, weight_bits=8, act_bits=8)
    with torch.no_grad():
        lin.weight.copy_(torch.round(w / scale[:, None]).to(torch.int8))
        lin.weight_scale.copy_(scale)
        lin.bias.copy_(b)
    x = torch.randn(32, 48, generator=g)
    ref = x @ w.T + b
    err = ((lin(x) - ref).norm() / (ref - b).norm()).item()
    assert err < 0.02  # measured ~0.006


def test_static_clamps_to_act_grid():
    lin = _make_linear(act_mode="static", abits=6)
    x = torch.tensor([[-500.0, -31.6, -31.4, -2.5, 0.4, 0.6, 30.6, 31.4, 31.6, 40.0, 1e4, -1e4, 3.0]])
    codes, step = lin.quantize_input(x)
    assert step is None and codes.dtype == torch.int8
    assert codes.tolist() == [[-31, -31, -31, -2, 0, 1, 31, 31, 31, 31, 31, -31, 3]]


def test_input_offset_is_subtracted_before_rounding():
    plain = _make_linear(offset=False)
    shifted = _make_linear(offset=True)
    shifted.load_state_dict({**plain.state_dict(), "input_offset": shifted.input_offset})
    x = torch.randn(6, 13, generator=_gen(4)) * 30
    # with the offset the layer quantizes (x - offset): feeding x + offset reproduces the plain layer exactly
    assert torch.equal(shifted(x + shifted.input_offset), plain(x))
    assert not torch.allclose(shifted(x), plain(x))
    codes, _ = shifted.quantize_input(x)
    assert torch.equal(codes.float(), torch.clamp(torch.round(x - shifted.input_offset), -127, 127))


def test_storage_layout_and_format():
    lin = _make_linear(offset=True, bias=True)
    sd = lin.state_dict()
    assert set(sd) == {"weight", "weight_scale", "bias", "input_offset"}
    assert sd["weight"].dtype == torch.int8 and sd["weight"].shape == (7, 13)
    assert sd["weight_scale"].dtype == torch.float32 and sd["weight_scale"].shape == (7,)
    assert sd["input_offset"].dtype == torch.float32 and sd["input_offset"].shape == (13,)
    assert not lin.weight.requires_grad
    fmt = lin.format
    assert (fmt["act"], fmt["offset"], fmt["bias"]) == ("static", True, True)
    dyn = _make_linear(act_mode="dynamic", bias=False)
    assert set(dyn.state_dict()) == {"weight", "weight_scale"}
    fmt = dyn.format
    assert (fmt["act"], fmt["offset"], fmt["bias"]) == ("dynamic", False, False)
    torch.testing.assert_close(lin.dequantized_weight(), lin.weight.float() * lin.weight_scale[:, None])
    assert "W8A8" in repr(lin) and "act=static" in repr(lin)


def test_bias_dtype_and_output_dtype_follow_input():
    lin = OutlierTuneLinear(8, 4, bias=True, act_mode="dynamic", has_input_offset=False, weight_bits=8,
                            act_bits=8, dtype=torch.bfloat16)
    assert lin.bias.dtype == torch.bfloat16 and lin.weight.dtype == torch.int8
    assert lin.weight_scale.dtype == torch.float32
    with torch.no_grad():
        lin.weight.fill_(1)
        lin.weight_scale.fill_(0.5)
        lin.bias.fill_(0)
    y = lin(torch.ones(2, 8, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16
    # codes 127 each, step 1/127: y = 127*8 * 0.5 / 127 = 4
    torch.testing.assert_close(y.float(), torch.full((2, 4), 4.0))


def test_constructor_rejects_bad_modes():
    with pytest.raises(ValueError, match="act_mode"):
        OutlierTuneLinear(4, 4, bias=False, act_mode="nope", has_input_offset=False, weight_bits=8, act_bits=8)
    with pytest.raises(ValueError, match="input_offset"):
        OutlierTuneLinear(4, 4, bias=False, act_mode="dynamic", has_input_offset=True, weight_bits=8, act_bits=8)


def test_w6a6_model_codes_stay_on_int6_grid():
    """A model quantized with weight_bits=6 (GPTQ, the default) stores codes in [-31, 31] and uses the full grid."""
    model = tiny_model("llama")
    hf_outliertune.quantize(model, small_config(weight_bits=6, act_bits=6, weight_algorithm="gptq",
                                                num_samples=4, seq_len=32), tiny_tokenizer())
    layers = [m for m in model.modules() if isinstance(m, OutlierTuneLinear)]
    assert len(layers) == 14
    for layer in layers:
        assert layer.weight.dtype == torch.int8
        assert (layer.weight_bits, layer.act_bits) == (6, 6)
        assert int(layer.weight.abs().max()) == 31
    # activations: the static quantizer clamps to ±31 as well
    static = next(m for m in layers if m.act_mode == "static")
    codes, _ = static.quantize_input(torch.full((3, static.in_features), 1e4))
    assert int(codes.max()) == 31


# ---------------------------------------------------------------- the int8 GEMM reference kernel


def _randint8(shape, g):
    return torch.randint(-128, 128, shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("m, k, n", [(1, 13, 7), (1, 1, 1), (5, 3, 2), (17, 13, 7), (33, 64, 24)])
def test_int8_matmul_reference_exact(m, k, n):
    g = _gen(m * 100 + k * 10 + n)
    a, w = _randint8((m, k), g), _randint8((n, k), g)
    ref = a.double() @ w.double().T
    y = int8_matmul_reference(a, w, torch.ones(n), out_dtype=torch.float64)
    assert y.dtype == torch.float64 and torch.equal(y, ref)
    acc = kernel_module._int32_matmul(a, w)
    assert acc.dtype == torch.int32 and torch.equal(acc.double(), ref)


def test_int8_matmul_non_contiguous_inputs():
    g = _gen(7)
    a = _randint8((6, 26), g)[:, ::2]  # (6, 13), strided
    w = _randint8((13, 14), g).t()[:7]  # (7, 13), transposed view
    w2 = _randint8((14, 13), g)[::2]  # (7, 13), row-strided
    assert not a.is_contiguous() and not w.is_contiguous() and not w2.is_contiguous()
    for ww in (w, w2):
        ref = a.double() @ ww.double().T
        assert torch.equal(kernel_module._int32_matmul(a, ww).double(), ref)
        assert torch.equal(int8_matmul_reference(a, ww, torch.ones(7), out_dtype=torch.float64), ref)


def test_int32_accumulation_exact_beyond_float32():
    """|Σ| = 128²·K > 2²⁴: a float32 accumulator would round, the int32 path must not."""
    k = 4099
    a = torch.full((3, k), -128, dtype=torch.int8)
    w = torch.full((2, k), -128, dtype=torch.int8)
    a[1, 0] = 127  # makes the exact sum odd: not representable in float32 at this magnitude
    acc = kernel_module._int32_matmul(a, w)
    assert acc[0, 0].item() == 128 * 128 * k
    assert acc[1, 0].item() == 128 * 128 * (k - 1) - 127 * 128
    assert torch.equal(acc.double(), a.double() @ w.double().T)


def test_int8_matmul_epilogue():
    g = _gen(8)
    a, w = _randint8((9, 13), g), _randint8((7, 13), g)
    w_scale = torch.rand(7, generator=g) + 0.1
    a_scale = torch.rand(9, generator=g) + 0.1
    bias = torch.randn(7, generator=g)
    acc = a.double() @ w.double().T
    expected = acc * w_scale.double()[None] * a_scale.double()[:, None] + bias.double()[None]
    for fn in (int8_matmul, int8_matmul_reference):
        y = fn(a, w, w_scale, a_scale, bias)
        assert y.dtype == torch.float32
        torch.testing.assert_close(y.double(), expected, rtol=1e-6, atol=1e-6)
        assert fn(a, w, w_scale, None, None, out_dtype=torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(int8_matmul(a, w, w_scale).double(), acc * w_scale.double()[None], rtol=1e-6, atol=0)
    assert torch.equal(int8_matmul(a, w, w_scale, a_scale, bias), int8_matmul_reference(a, w, w_scale, a_scale, bias))


def test_model_dtype_cast_keeps_the_stored_scales(tiny_dir, eval_ids):
    """`model.to(torch.bfloat16)` casts biases and activations, not the quantization scales: OutlierTune's fp32
    steps stay exact fp32 and AdaDim's fp16 group parameters stay fp16 (the kernels refuse bf16 ones)."""
    from transformers import AutoModelForCausalLM

    from hf_outliertune.weight_only_linear import WeightOnlyLinear

    for config in (small_config(), small_config(act_bits=None, weight_bits=4, weight_algorithm="rtn", group_size=32)):
        model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=config,
                                                     dtype=torch.float32)
        layers = [m for m in model.modules() if isinstance(m, (OutlierTuneLinear, WeightOnlyLinear))]
        before = {id(m): m.weight_scale.clone() for m in layers}
        ref = logits_of(model, eval_ids)
        model.to(torch.bfloat16)
        for m in layers:
            assert m.weight_scale.dtype == before[id(m)].dtype and torch.equal(m.weight_scale, before[id(m)])
            if m.bias is not None:
                assert m.bias.dtype == torch.bfloat16
        got = logits_of(model, eval_ids)
        assert got.dtype == torch.bfloat16
        assert rel_err(ref, got.float()) < 0.05
