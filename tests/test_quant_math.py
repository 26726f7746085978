"""The method's pure tensor math: grids, weight/activation steps, clipping searches, GPTQ, statistics."""

from __future__ import annotations

import pytest
import torch

from hf_outliertune import quant_math as qm


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _row_sq_err(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    deq = qm.quantize_weight(w, scale, bits).float() * scale[:, None]
    return (w - deq).pow(2).sum(dim=1)


def _col_sq_err(x: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    return (x - qm.round_clamp(x / step, bits) * step).pow(2).sum(dim=0)


def test_qmax():
    assert qm.qmax(8) == 127
    assert qm.qmax(6) == 31
    assert qm.qmax(4) == 7
    assert qm.qmax(2) == 1


@pytest.mark.parametrize("bits", [8, 6])
def test_round_clamp(bits):
    q = qm.qmax(bits)
    x = torch.tensor([-1e6, -q - 0.6, -2.5, -0.4, 0.0, 0.6, 1.5, q - 0.4, q + 0.49, 1e6])
    out = qm.round_clamp(x, bits)
    expected = torch.tensor([-q, -q, -2.0, 0.0, 0.0, 1.0, 2.0, q, q, q], dtype=out.dtype)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("bits", [8, 6])
def test_weight_scales_absmax_maps_row_max_onto_grid(bits):
    w = torch.randn(16, 40, generator=_gen())
    w[3] = 0.0  # an all-zero row must not give a zero (or NaN) step
    s = qm.weight_scales_absmax(w, bits)
    assert s.shape == (16,) and torch.all(s > 0) and torch.isfinite(s).all()
    codes = qm.quantize_weight(w, s, bits)
    assert codes.dtype == torch.int8
    q = qm.qmax(bits)
    nz = [i for i in range(16) if i != 3]
    assert torch.equal(codes[nz].abs().amax(dim=1), torch.full((15,), q, dtype=torch.int8))
    assert torch.all(codes[3] == 0)
    # round to nearest: dequantization error at most half a step everywhere
    err = (w - codes.float() * s[:, None]).abs()
    assert torch.all(err <= s[:, None] / 2 * (1 + 1e-5))


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_weight_scales_mse_never_worse_than_absmax(bits):
    g = _gen(1)
    w = torch.cat([torch.randn(16, 256, generator=g), torch.distributions.Laplace(0.0, 1.0).sample((16, 256))])
    s_abs = qm.weight_scales_absmax(w, bits)
    s_mse = qm.weight_scales_mse(w, bits)
    e_abs, e_mse = _row_sq_err(w, s_abs, bits), _row_sq_err(w, s_mse, bits)
    assert torch.all(e_mse <= e_abs * (1 + 1e-6)), "the MSE search must never lose to its own ratio-1.0 candidate"
    # steps are a clip of the absmax step: ratio in [0.5, 1]
    ratio = s_mse / s_abs
    assert torch.all(ratio <= 1 + 1e-6) and torch.all(ratio >= 0.5 - 1e-6)
    if bits == 4:
        # measured: total error 0.74-0.76x of absmax at 4 bits (clipping clearly pays off on 256-wide rows)
        assert e_mse.sum() < 0.85 * e_abs.sum()
        assert (e_mse < e_abs).sum() >= 24  # measured: all 32 rows improve


@pytest.mark.parametrize("bits", [8, 6, 4])
def test_act_steps_mse_never_worse_than_max_step(bits):
    g = _gen(2)
    x = torch.randn(512, 32, generator=g) * (torch.rand(32, generator=g) * 3 + 0.1)
    absmax = x.abs().amax(dim=0)
    s_max = qm.act_steps_max(absmax, bits)
    assert torch.allclose(s_max, absmax / qm.qmax(bits))
    s_mse = qm.act_steps_mse(x, absmax, bits)
    e_max, e_mse = _col_sq_err(x, s_max, bits), _col_sq_err(x, s_mse, bits)
    assert torch.all(e_mse <= e_max * (1 + 1e-6))
    assert torch.all(s_mse <= s_max * (1 + 1e-6)) and torch.all(s_mse >= 0.5 * s_max * (1 - 1e-6))
    if bits == 4:
        assert e_mse.sum() < 0.8 * e_max.sum()  # measured 0.69x


def test_act_steps_use_full_calibrated_range():
    """The step search starts from the full calibrated range even when the samples show a smaller one."""
    x = torch.randn(256, 8, generator=_gen(3))
    absmax = x.abs().amax(dim=0) * 4  # e.g. a rare token outside the strided sample subset
    s = qm.act_steps_mse(x, absmax, 8)
    assert torch.all(s >= 0.5 * absmax / 127 * (1 - 1e-6))


def test_channel_shift_is_midpoint():
    lo = torch.tensor([-3.0, 0.0, 1.0, -5.0])
    hi = torch.tensor([1.0, 2.0, 9.0, -1.0])
    assert torch.equal(qm.channel_shift(lo, hi), torch.tensor([-1.0, 1.0, 5.0, -3.0]))


def test_smoothquant_scales_balance_ranges():
    g = _gen(4)
    a = torch.rand(16, generator=g) * 20 + 0.1
    w = torch.rand(16, generator=g) + 0.01
    s = qm.smoothquant_scales(a, w, 0.5)
    # alpha=0.5 equalises the migrated activation and weight ranges per channel
    torch.testing.assert_close(a / s, w * s, rtol=1e-5, atol=0)
    s1 = qm.smoothquant_scales(a, w, 1.0)
    torch.testing.assert_close(a / s1, torch.ones(16), rtol=1e-5, atol=0)  # all difficulty moves to weights
    s0 = qm.smoothquant_scales(a, w, 0.0)
    torch.testing.assert_close(w * s0, torch.ones(16), rtol=1e-5, atol=0)


@pytest.mark.parametrize("bits", [8, 6])
def test_quantize_per_token_round_trip(bits):
    g = _gen(5)
    x = torch.randn(37, 29, generator=g) * torch.logspace(-3, 2, 37)[:, None]
    x[5] = 0.0
    codes, step = qm.quantize_per_token(x, bits)
    q = qm.qmax(bits)
    assert codes.dtype == torch.int8 and step.shape == (37,)
    assert torch.isfinite(step).all() and torch.all(step > 0)
    assert int(codes.abs().max()) == q
    nz = [i for i in range(37) if i != 5]
    assert torch.equal(codes[nz].abs().amax(dim=1), torch.full((36,), q, dtype=torch.int8))
    assert torch.all(codes[5] == 0)
    err = (x - codes.float() * step[:, None]).abs()
    assert torch.all(err <= step[:, None] / 2 * (1 + 1e-5))


def test_centered_second_moment_matches_direct():
    g = _gen(6)
    x = torch.randn(300, 12, generator=g) * 3 + torch.randn(12, generator=g) * 5
    z = torch.randn(12, generator=g) * 4
    xd = x.double()
    xtx = xd.T @ xd
    h = qm.centered_second_moment(xtx, xd.sum(0), x.shape[0], z)
    direct = (xd - z.double()).T @ (xd - z.double())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), direct, rtol=1e-6, atol=1e-6 * direct.abs().max().item())
    # and it is not simply the uncentered moment
    assert (h.double() - xtx).abs().max() > 1.0


def _correlated_problem(seed: int, n: int = 512, k: int = 64, o: int = 32):
    g = _gen(seed)
    mix = torch.randn(k, k, generator=g)
    x = torch.randn(n, k, generator=g) @ mix * 0.3 + torch.randn(n, k, generator=g) * 0.05
    w = torch.randn(o, k, generator=g)
    return w, x


@pytest.mark.parametrize("bits", [8, 6])
@pytest.mark.parametrize("act_order, block_size", [(True, 128), (False, 16)])
def test_gptq_beats_round_to_nearest(bits, act_order, block_size):
    w, x = _correlated_problem(seed=bits)
    h = x.T @ x
    s = qm.weight_scales_absmax(w, bits)
    gq = qm.gptq_quantize(w, h, s, bits, damp=0.01, block_size=block_size, act_order=act_order)
    rtn = qm.quantize_weight(w, s, bits)
    assert gq.dtype == torch.int8 and gq.shape == w.shape
    assert int(gq.abs().max()) <= qm.qmax(bits)
    err_g = ((w - gq.float() * s[:, None]) @ x.T).norm()
    err_r = ((w - rtn.float() * s[:, None]) @ x.T).norm()
    # measured: GPTQ output error is 0.66-0.73x of round-to-nearest on this correlated input
    assert err_g < 0.85 * err_r
    # it changes codes by small amounts only (error feedback, not a different grid)
    assert int((gq.int() - rtn.int()).abs().max()) <= 8


def test_gptq_identity_hessian_is_round_to_nearest():
    """With uncorrelated inputs there is nothing to compensate: GPTQ reduces to round-to-nearest."""
    w, _ = _correlated_problem(seed=7)
    s = qm.weight_scales_absmax(w, 8)
    gq = qm.gptq_quantize(w, torch.eye(w.shape[1]) * 10, s, 8)
    assert torch.equal(gq, qm.quantize_weight(w, s, 8))


def test_gptq_dead_input_channels():
    w, x = _correlated_problem(seed=8)
    x[:, [3, 10]] = 0.0  # channels never active in calibration
    h = x.T @ x
    s = qm.weight_scales_absmax(w, 8)
    gq = qm.gptq_quantize(w, h, s, 8)
    assert torch.all(gq[:, [3, 10]] == 0)
    rtn = qm.quantize_weight(w, s, 8)
    err_g = ((w - gq.float() * s[:, None]) @ x.T).norm()
    err_r = ((w - rtn.float() * s[:, None]) @ x.T).norm()
    assert torch.isfinite(err_g) and err_g < err_r
