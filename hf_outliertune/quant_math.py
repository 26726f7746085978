"""The method's math as pure tensor functions: grids, steps, shifts, clipping searches and GPTQ.

Nothing here knows about modules or models; `pipeline.py` applies these functions to a model.
Conventions: weights are `(out_features, in_features)`; activations are `(tokens, in_features)`;
grids are symmetric, codes in `[-qmax, qmax]` with `qmax = 2**(bits-1) - 1`.
"""

from __future__ import annotations

import torch

CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 ... 0.5
_TINY = 1e-8


def qmax(bits: int) -> int:
    """Largest code of a symmetric signed `bits`-bit grid."""
    return 2 ** (bits - 1) - 1


def round_clamp(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Round to the nearest integer and clamp to the symmetric grid (the whole runtime activation quantizer)."""
    q = qmax(bits)
    return torch.clamp(torch.round(x), -q, q)


def quantize_weight(weight: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes of `weight` with one step per output channel (`scale` has shape `(out,)`)."""
    return round_clamp(weight.float() / scale.float()[:, None], bits).to(torch.int8)


def weight_scales_absmax(weight: torch.Tensor, bits: int) -> torch.Tensor:
    """Per-output-channel step that maps each row's absmax onto the grid."""
    return (weight.float().abs().amax(dim=1) / qmax(bits)).clamp(min=_TINY)


def weight_scales_mse(weight: torch.Tensor, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per-output-channel step with the clip ratio (of the row absmax) that minimises the row's squared error."""
    w = weight.float()
    base = weight_scales_absmax(w, bits)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for r in ratios:
        s = (base * r).clamp(min=_TINY)
        err = (w - round_clamp(w / s[:, None], bits) * s[:, None]).pow(2).sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, s, best)
    return best


def channel_shift(ch_min: torch.Tensor, ch_max: torch.Tensor) -> torch.Tensor:
    """Symmetrization shift z_j: the midpoint of each channel's calibrated range."""
    return (ch_max.float() + ch_min.float()) / 2


def act_steps_max(centered_absmax: torch.Tensor, bits: int) -> torch.Tensor:
    """Static per-channel activation step Δ_j = max|x_j - z_j| / qmax."""
    return (centered_absmax.float() / qmax(bits)).clamp(min=_TINY)


def act_steps_mse(
    samples: torch.Tensor, centered_absmax: torch.Tensor, bits: int, ratios: tuple[float, ...] = CLIP_RATIOS
) -> torch.Tensor:
    """Per-channel activation step with the clip ratio minimising each channel's squared error.

    `samples` are centered activations `(tokens, channels)`; `centered_absmax` is the full calibrated
    `max|x_j - z_j|` (which may be larger than what the sample subset shows).
    """
    x = samples.float()
    base = act_steps_max(centered_absmax, bits)
    best_err = torch.full_like(base, float("inf"))
    best = base.clone()
    for r in ratios:
        step = base * r
        err = (x - round_clamp(x / step, bits) * step).pow(2).sum(dim=0)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, step, best)
    return best


def smoothquant_scales(
    act_absmax: torch.Tensor, weight_absmax_per_in: torch.Tensor, alpha: float
) -> torch.Tensor:
    """SmoothQuant migration factors s_j = max|X_j|^α / max|W_:,j|^(1-α) (X is divided by s, W multiplied)."""
    a = act_absmax.float().clamp(min=1e-5)
    w = weight_absmax_per_in.float().clamp(min=1e-5)
    return (a.pow(alpha) / w.pow(1 - alpha)).clamp(min=1e-5)


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token absmax quantization of `(tokens, channels)`: int8 codes and a `(tokens,)` step."""
    xf = x.float()
    step = (xf.abs().amax(dim=-1) / qmax(bits)).clamp(min=_TINY)
    return round_clamp(xf / step[:, None], bits).to(torch.int8), step


def centered_second_moment(
    xtx: torch.Tensor, x_sum: torch.Tensor, count: int, shift: torch.Tensor
) -> torch.Tensor:
    """Σ_t (x_t - z)(x_t - z)ᵀ from Σ x xᵀ, Σ x and the token count, without revisiting the tokens."""
    z = shift.double()
    s = x_sum.double()
    h = xtx.double() - torch.outer(z, s) - torch.outer(s, z) + count * torch.outer(z, z)
    return h.float()


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scale: torch.Tensor,
    bits: int,
    damp: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with fixed per-output-channel steps; returns int8 codes.

    `hessian` is Σ x xᵀ over the layer's calibration inputs (any positive scale). Columns are visited in
    order of decreasing Hessian diagonal (act-order), which is free with per-channel steps.
    """
    w = weight.float().clone()
    h = hessian.float().clone()
    n_in = w.shape[1]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n_in, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n_in, device=h.device)
    h_inv = _upper_cholesky_of_inverse(h)
    s = scale.float()[:, None]
    q = qmax(bits)
    codes = torch.zeros_like(w)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i : i + 1]
            c = torch.clamp(torch.round(col / s), -q, q)
            codes[:, i1 + i : i1 + i + 1] = c
            err = (col - c * s) / hinv1[i, i]
            w1[:, i:] -= err @ hinv1[i : i + 1, i:]
            err1[:, i : i + 1] = err
        w[:, i2:] -= err1 @ h_inv[i1:i2, i2:]
    return codes[:, torch.argsort(perm)].to(torch.int8)


def _upper_cholesky_of_inverse(h: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹, adding damping until H is numerically positive definite."""
    eye = torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    extra = 0.0
    for _ in range(8):
        chol, info = torch.linalg.cholesky_ex(h + extra * eye)
        if int(info) == 0:
            inv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(inv, upper=True)
        extra = max(extra * 10, 1e-4 * float(torch.diag(h).mean()))
    raise ValueError("GPTQ: the calibration Hessian is not positive definite even after damping; use more data.")


def least_squares_weight(
    weight: torch.Tensor, cross: torch.Tensor, hessian: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """Ŵ = (W C + λW)(H + λI)⁻¹: the float weight that best maps quantized inputs q onto the outputs W x.

    `cross` is C = Σ x qᵀ and `hessian` H = Σ q qᵀ over calibration tokens. Minimising
    Σ‖W x − Ŵ q‖² + λ‖Ŵ − W‖² compensates the systematic part of the activation rounding (e.g. small values
    rounded to zero) through correlated channels, while the ridge term keeps Ŵ near W where the
    calibration data says little; GPTQ on Ŵ with H then minimises the same objective for the integer weight.
    """
    w = weight.double()
    h = hessian.double()
    lam = damp * torch.diag(h).mean()
    h = h + lam * torch.eye(h.shape[0], device=h.device, dtype=h.dtype)
    rhs = (w @ cross.double() + lam * w).t()
    return torch.linalg.solve(h, rhs).t().float()
