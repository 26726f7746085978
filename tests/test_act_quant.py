"""Activation-quantization kernels (`kernels/act_quant.py`) against their pure-PyTorch references.

Without a GPU the Triton kernels run under the interpreter (TRITON_INTERPRET=1, set by conftest before triton
is imported), where fp32 arithmetic is numpy's: the codes must then equal the reference's exactly. On a GPU the
compiled kernels may reorder the row reductions and use approximate division, so codes may differ by one step
in rare ties: at most 1, in under 0.5 % of entries (under 5 % for the in-kernel Hadamard rotation, whose
second stage runs in TF32 on the GPU). Steps (per-token scales) within 1e-5 relative.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from hf_outliertune.kernels import act_quant as aq  # noqa: E402
from hf_outliertune.quant_math import quantize_per_token, round_clamp  # noqa: E402
from hf_outliertune.rotation import rotate  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def assert_codes_match(got: torch.Tensor, ref: torch.Tensor, exact: bool = True, tie_fraction: float = 5e-3) -> None:
    assert got.dtype == torch.int8 and got.shape == ref.shape
    diff = (got.int() - ref.int()).abs()
    if CUDA or not exact:
        assert diff.max().item() <= 1 and (diff > 0).float().mean().item() < tie_fraction
    else:
        assert torch.equal(got, ref)


@pytest.mark.parametrize("kind", ["rms", "layer"])
@pytest.mark.parametrize("m,k", [(1, 48), (7, 576), (3, 5000)])
@pytest.mark.parametrize("bits", [8, 6])
def test_norm_quant_matches_reference(kind, m, k, bits):
    g = torch.Generator().manual_seed(m * k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE)
    x[:, 1] *= 40  # an outlier channel
    w = (torch.rand(k, generator=g) * 60 + 10).to(DEVICE)
    bias = torch.randn(k, generator=g).to(DEVICE) if kind == "layer" else None
    offset = torch.randn(k, generator=g).to(DEVICE)
    for off in (offset, None):
        ref = aq.norm_quant_reference(x, w, bias, 1e-5, kind, 1.0, off, bits)
        got = aq.norm_quant_triton(x, w, bias, 1e-5, kind, 1.0, off, bits)
        assert_codes_match(got, ref)
        assert ref.abs().max().item() == 2 ** (bits - 1) - 1  # the clamp is exercised


def test_norm_quant_bf16_input_and_strided_rows():
    x = torch.randn(6, 2 * 96, dtype=torch.bfloat16, device=DEVICE)[:, :96]  # row stride 192
    w = torch.rand(96, device=DEVICE) * 30
    assert_codes_match(
        aq.norm_quant_triton(x, w, None, 1e-6, "rms", 0.0, None, 8),
        aq.norm_quant_reference(x, w, None, 1e-6, "rms", 0.0, None, 8),
    )


def test_static_quant_matches_reference_and_round_half_even():
    x = torch.tensor([[0.5, 1.5, 2.5, -0.5, -1.5, 200.0, -200.0, 3.49]], device=DEVICE)
    assert aq.static_quant_triton(x, None, 8).tolist() == [[0, 2, 2, 0, -2, 127, -127, 3]]
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(5, 1500, generator=g) * 50).to(DEVICE)
    off = torch.randn(1500, generator=g).to(DEVICE)
    assert torch.equal(aq.static_quant_triton(x, off, 6), aq.static_quant_reference(x, off, 6))


@pytest.mark.parametrize("block,k", [(1, 300), (64, 128), (256, 512), (512, 1536), (2048, 4096)])
def test_per_token_quant_matches_reference(block, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, k, generator=g).to(DEVICE)
    x[:, 5] *= 50
    x[2] = 0.0  # an all-zero row gets the minimum step, not NaN
    codes, step = aq.per_token_quant_triton(x, 8, block)
    ref_codes, ref_step = aq.per_token_quant_reference(x, 8, block)
    # the in-kernel rotation (H_B1 ⊗ H_B2) sums in another order than the reference's butterflies, and on the GPU
    # both its stages round fp32 inputs to TF32 (2^-11 relative each; bf16 inputs pass the first stage exactly):
    # the row maximum, hence the step, moves by up to ~1e-3 there and more one-step ties flip
    tf32 = CUDA and block >= 256
    assert_codes_match(codes, ref_codes, exact=block < 256, tie_fraction=0.05 if tf32 else 5e-3)
    torch.testing.assert_close(step, ref_step, rtol=4e-3 if tf32 else 1e-5, atol=0)
    assert torch.isfinite(step).all() and step[2].item() == pytest.approx(aq.TINY)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("block,k", [(256, 768), (2048, 4096)])
def test_split_and_one_program_rotation_agree(monkeypatch, m, block, k):
    # Few rows take the split path (one program per row and block, two kernels); many rows one program per row.
    # Both rotate each block with the same dots and quantize with the same arithmetic: identical codes and steps.
    g = torch.Generator().manual_seed(m + k)
    x = (torch.randn(m, k, generator=g) * 3).to(DEVICE, torch.bfloat16)
    x[:, 7] *= 40
    assert m <= aq.SPLIT_HADAMARD_MAX_M
    split = aq.per_token_quant_triton(x, 8, block)
    monkeypatch.setattr(aq, "SPLIT_HADAMARD_MAX_M", 0)
    one_program = aq.per_token_quant_triton(x, 8, block)
    assert torch.equal(split[0], one_program[0]) and torch.equal(split[1], one_program[1])


@pytest.mark.parametrize("split", [False, True], ids=["one-program", "split"])
@pytest.mark.parametrize("block,k", [(1, 300), (64, 128), (256, 768), (2048, 4096)])
def test_silu_mul_quant_matches_reference(monkeypatch, block, k, split):
    """Gated MLP input: silu(gate) · up formed in fp32 inside the kernel, from strided bf16 halves of one tensor."""
    if not split:
        monkeypatch.setattr(aq, "SPLIT_HADAMARD_MAX_M", 0)
    g = torch.Generator().manual_seed(block + k)
    gate_up = (torch.randn(3, 2 * k, generator=g) * 3).to(DEVICE, torch.bfloat16)
    gate_up[:, 11] *= 30
    gate, up = gate_up[:, :k], gate_up[:, k:]  # row stride 2k: no copy
    codes, step = aq.per_token_quant_triton(gate, 8, block, up=up)
    ref_codes, ref_step = aq.silu_mul_per_token_quant_reference(gate, up, 8, block)
    unfused = aq.per_token_quant_reference(aq.silu_mul(gate, up), 8, block)
    assert torch.equal(ref_codes, unfused[0]) and torch.equal(ref_step, unfused[1])
    # the kernel's sigmoid and the reference's silu may differ in the last fp32 bit: rare one-step ties
    tf32 = CUDA and block >= 256
    assert_codes_match(codes, ref_codes, exact=False, tie_fraction=0.05 if tf32 else 5e-3)
    torch.testing.assert_close(step, ref_step, rtol=4e-3 if tf32 else 1e-5, atol=0)


def test_silu_mul_quant_dispatch():
    """The public entry point: the reference on CPU tensors, the kernel on CUDA ones."""
    gate, up = torch.randn(2, 256, device=DEVICE), torch.randn(2, 256, device=DEVICE)
    codes, step = aq.silu_mul_per_token_quant(gate, up, 8, 256)
    ref_codes, ref_step = aq.silu_mul_per_token_quant_reference(gate, up, 8, 256)
    assert_codes_match(codes, ref_codes, exact=not CUDA, tie_fraction=0.05)
    torch.testing.assert_close(step, ref_step, rtol=4e-3, atol=0)


def test_silu_mul_quant_refuses_mismatched_halves():
    with pytest.raises(ValueError, match="differ in shape"):
        aq.per_token_quant_triton(torch.zeros(2, 8, device=DEVICE), 8, 1, up=torch.zeros(2, 16, device=DEVICE))


def test_references_agree_with_the_calibration_math():
    """What calibration assumed (quant_math, rotation) is what the runtime kernels compute."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 512, generator=g) * 7
    codes, step = aq.per_token_quant_reference(x, 8, 256)
    ref_codes, ref_step = quantize_per_token(rotate(x, 256), 8)
    assert torch.equal(codes, ref_codes) and torch.equal(step, ref_step)
    assert torch.equal(aq.static_quant_reference(x, None, 6), round_clamp(x, 6).to(torch.int8))


def test_hadamard_factors():
    assert aq.hadamard_factors(2048) == (64, 32)
    assert aq.hadamard_factors(256) == (16, 16)
    assert aq.hadamard_factors(128) is None and aq.hadamard_factors(768) is None


def test_dispatch_rejects_unknown_norm_kind():
    with pytest.raises(ValueError, match="kind="):
        aq.norm_quant(torch.zeros(1, 4), torch.ones(4), None, 1e-5, "batch", 0.0, None, 8)
