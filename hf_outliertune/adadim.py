"""AdaDim weight-only quantization as pure tensor functions: group grids in both layouts, RTN, GPTQ, the
group-parameter refit, the criterion.

Conventions: a weight is `(N, K) = (out_features, in_features)`; codes are unsigned `q ∈ [0, 2^bits − 1]`;
a group has an fp16 `scale` and an fp16 `zero`, and dequantizes as `(q − zero) · scale` in fp32.

Grids start min-max per group with the range widened to include 0 (as GPTQ's quantizer does), so the zero is
an integer code; `refit_group_params` then re-solves scale and zero for the output error, and the zero becomes
fractional.

- ``"oc"`` (the usual layout, AdaDim's per-OC): a group is `group_size` consecutive *input* channels of one
  output row; `scale`/`zero` have shape `(N, ceil(K / g))`, index `[n, k // g]`.
- ``"ic"`` (AdaDim's per-IC): a group is `group_size` consecutive *output* channels of one input column, so an
  input channel with activation outliers gets scales of its own; shape `(ceil(N / g), K)`, index `[n // g, k]`.

The last group may be ragged (576 = 4·128 + 64). Scales are rounded to fp16 *before* the codes are computed,
so `dequantize(...)` of what is returned is exactly the weight the stored checkpoint applies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .quant_math import CLIP_RATIOS, _upper_cholesky_of_inverse

GROUP_LAYOUTS = ("oc", "ic")
_SCALE_FLOOR = 1e-7  # smallest step kept (an fp16 subnormal): all-equal groups still get a finite, nonzero step
_FP16_MAX = 65504.0
_CLIP_CHUNK = 1 << 22  # values evaluated at once by the clip search (all ratios × a chunk of rows)


@dataclass
class GroupQuantized:
    """A weight's codes `(N, K)` (uint8) with its fp16 `scale` and `zero` in the layout of `group_dim`."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int
    group_dim: str

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight `(q − zero) · scale`."""
        return dequantize(self.codes, self.scale, self.zero, self.group_size, self.group_dim)


def max_code(bits: int) -> int:
    """Largest unsigned code of a `bits`-bit grid."""
    return 2**bits - 1


def num_groups(length: int, group_size: int) -> int:
    """Groups along a dimension of `length` (the last one possibly ragged)."""
    return -(-length // group_size)


def expand_groups(params: torch.Tensor, group_size: int, group_dim: str, shape: tuple[int, int]) -> torch.Tensor:
    """Per-group `params` repeated to one value per weight element (fp32, shape `(N, K)`)."""
    n, k = shape
    if group_dim == "oc":
        return params.float().repeat_interleave(group_size, dim=1)[:, :k]
    return params.float().repeat_interleave(group_size, dim=0)[:n]


def dequantize(
    codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int, group_dim: str
) -> torch.Tensor:
    """fp32 weight `(codes − zero) · scale` from unpacked codes `(N, K)` and per-group fp16 parameters."""
    shape = tuple(codes.shape)
    s = expand_groups(scale, group_size, group_dim, shape)
    z = expand_groups(zero, group_size, group_dim, shape)
    return (codes.float() - z) * s


# ---------------------------------------------------------------------------------------------- row groups
# The primitives below see a matrix of rows `(R, L)` grouped along L; "ic" is "oc" on the transpose.


def _pad_groups(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """`(R, G, g)` view of rows `(R, L)`; a ragged last group is padded with copies of the row's last value,
    which leaves its min and max unchanged."""
    r, length = x.shape
    pad = num_groups(length, group_size) * group_size - length
    if pad:
        x = torch.cat([x, x[:, -1:].expand(r, pad)], dim=1)
    return x.reshape(r, -1, group_size)


def _grid_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step and integer zero point of an asymmetric grid covering [min(lo, 0), max(hi, 0)], as fp32 tensors.

    The range always holds 0, so the zero point is a code in [0, 2^bits − 1]; the step is rounded *up* to
    fp16, so the whole range stays on the grid and no value is off by more than half a step. No host sync:
    GPTQ calls this once per column.
    """
    lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    step = ((hi - lo) / max_code(bits)).clamp(min=_SCALE_FLOOR)
    half = step.half()  # a step beyond fp16 becomes inf here: `_check_steps` refuses it once per weight
    half = torch.where(half.float() < step, torch.nextafter(half, torch.full_like(half, float("inf"))), half)
    step = half.float()
    zero = torch.clamp(torch.round(-lo / step), 0, max_code(bits))
    return step, zero


def _round_to_grid(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes `clamp(round(x / step + zero), 0, 2^bits − 1)` (broadcasting; the zero may be fractional)."""
    return torch.clamp(torch.round(x / step + zero), 0, max_code(bits))


def _grouped_codes(xg: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of grouped values `(R, G, g)` with per-group `step`/`zero` `(R, G)`."""
    return _round_to_grid(xg, step[..., None], zero[..., None], bits)


def _check_steps(step: torch.Tensor) -> None:
    """Refuse a weight whose group range is too wide for an fp16 step (one host sync per weight)."""
    if not bool(torch.isfinite(step).all()):
        raise ValueError(
            "A weight group holds NaN/inf or spans a range whose quantization step exceeds the fp16 maximum "
            f"({_FP16_MAX:.0f}); the weights are corrupt or not a trained model's."
        )


@functools.lru_cache(maxsize=8)
def _clip_ratios(device: torch.device) -> torch.Tensor:
    """`CLIP_RATIOS` as a `(ratios, 1, 1)` tensor, made once per device (not once per GPTQ column)."""
    return torch.tensor(CLIP_RATIOS, device=device)[:, None, None]


def row_group_params(
    x: torch.Tensor,
    bits: int,
    group_size: int,
    clip: bool = False,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max grid of each group of `group_size` consecutive values in each row of `x` `(R, L)`.

    With `clip`, each group's range [min, max] is shrunk by the ratio in `CLIP_RATIOS` that minimises the
    group's squared error weighted by `importance` (`(L,)` or `(R, L)`, e.g. the mean squared activation of
    each input channel; uniform when None). Returns fp32 `(scale, zero)` of shape `(R, ceil(L / g))`, the
    scale already rounded to fp16.
    """
    xg = _pad_groups(x.float(), group_size)
    lo, hi = xg.amin(dim=-1), xg.amax(dim=-1)
    if not clip:
        return _grid_params(lo, hi, bits)
    r, length = x.shape
    weight = torch.ones(r, length, device=x.device) if importance is None else importance.float().expand(r, length)
    wg = torch.cat([weight, weight.new_zeros(r, xg.shape[1] * group_size - length)], dim=1).reshape(xg.shape)
    ratios = _clip_ratios(x.device)
    rows = max(1, _CLIP_CHUNK // (len(CLIP_RATIOS) * xg[0].numel()))  # all ratios at once, rows in chunks
    params = [_best_clip(xg[i : i + rows], wg[i : i + rows], lo[i : i + rows], hi[i : i + rows], ratios, bits)
              for i in range(0, r, rows)]
    return torch.cat([p[0] for p in params]), torch.cat([p[1] for p in params])


def _best_clip(
    xg: torch.Tensor, wg: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, ratios: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, the grid of the shrink ratio with the least weighted squared error (the first ratio, 1.0,
    on ties)."""
    step, zero = _grid_params(lo * ratios, hi * ratios, bits)  # (ratios, R, G)
    deq = (_grouped_codes(xg, step, zero, bits) - zero[..., None]) * step[..., None]
    best = ((deq - xg).pow(2) * wg).sum(dim=-1).argmin(dim=0, keepdim=True)
    return step.gather(0, best)[0], zero.gather(0, best)[0]


def row_group_codes(x: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """Codes `(R, L)` (fp32 holding integers) of rows `x` with per-group `step`/`zero` `(R, G)`."""
    length = x.shape[1]
    return _grouped_codes(_pad_groups(x.float(), group_size), step, zero, bits).reshape(x.shape[0], -1)[:, :length]


# --------------------------------------------------------------------------------------------------- RTN


def quantize_rtn(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: str,
    clip: bool = False,
    input_sq: torch.Tensor | None = None,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GroupQuantized:
    """Round-to-nearest on an asymmetric min-max grid per group, in the layout `group_dim` ("oc" or "ic").

    `input_sq` `(K,)`, the mean squared calibration input per input channel, weights the clip search so it
    minimises the layer's output error rather than the weight's (it is uniform inside a per-IC group).
    `grid` = (scale, zero) in the layout's shape rounds to that grid instead.
    """
    _check_layout(group_dim)
    w = weight.float()
    rows = w if group_dim == "oc" else w.t()
    importance = input_sq if group_dim == "oc" else None
    if grid is None:
        step, zero = row_group_params(rows, bits, group_size, clip, importance)
    else:  # the grid's rows are `rows`' rows: as given for "oc", transposed for "ic"
        step, zero = (p.float() if group_dim == "oc" else p.float().t() for p in grid)
    _check_steps(step)
    codes = row_group_codes(rows, step, zero, bits, group_size)
    if group_dim == "ic":
        codes, step, zero = codes.t(), step.t(), zero.t()
    return _pack_result(codes, step, zero, bits, group_size, group_dim)


# -------------------------------------------------------------------------------------------------- GPTQ


def quantize_gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: str,
    damp: float = 0.01,
    act_order: bool = True,
    clip: bool = False,
    block_size: int = 128,
    grid: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> GroupQuantized:
    """GPTQ (Frantar et al. 2022) with per-group asymmetric grids in either layout.

    `hessian` is Σ x xᵀ over the layer's calibration inputs (any positive scale). Columns (input channels)
    are quantized one at a time and the rounding error of each is spread over the columns not yet quantized
    through the inverse Hessian, in lazy batches of `block_size` columns; `damp` adds that fraction of the
    mean diagonal to H. With `act_order` the columns go in order of decreasing H diagonal.

    - "oc": with act-order the group grids are fixed on the original weight before any update (static
      groups), which keeps act-order compatible with contiguous groups; without it, each group's grid is
      computed on the error-updated weight when GPTQ reaches its first column.
    - "ic": a column is one input channel, so GPTQ quantizes each error-updated column with its own groups
      along the output dimension; act-order costs nothing here.

    `grid` = (scale, zero) in the layout's shape fixes every group's grid in advance (e.g. one refitted by
    `refit_group_params`); GPTQ then only chooses the codes.
    """
    _check_layout(group_dim)
    h = hessian.float().clone()
    n, k = weight.shape
    # the weight is held transposed, (K, N): GPTQ visits input channels, and rows are contiguous
    wt = weight.float().t().contiguous()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    wt[dead] = 0
    input_sq = torch.diag(h)
    static = grid is not None or (group_dim == "oc" and act_order)
    if grid is not None:
        step_t, zero_t = grid[0].float().t().contiguous(), grid[1].float().t().contiguous()
    elif group_dim == "ic":
        step_t = torch.zeros(k, num_groups(n, group_size), device=wt.device)  # row j: input channel j's groups
    elif static:
        step, zero = row_group_params(wt.t(), bits, group_size, clip, input_sq)
        step_t, zero_t = step.t().contiguous(), zero.t().contiguous()  # row g: group g of every output row
    else:
        step_t = torch.zeros(num_groups(k, group_size), n, device=wt.device)
        block_size = max(block_size, group_size)  # a power of two: groups never straddle two lazy batches
    if not static:
        zero_t = torch.zeros_like(step_t)
    perm = torch.argsort(input_sq, descending=True) if act_order else torch.arange(k, device=wt.device)
    wt, h = wt[perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k, device=h.device)
    h_inv = _upper_cholesky_of_inverse(h)
    codes_t = torch.zeros_like(wt)
    order = perm.tolist()  # column indices on the host: no device sync per column
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = wt[i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = h_inv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = w1[i]
            j = order[i1 + i]
            if group_dim == "ic":
                if static:
                    st, zt = step_t[j : j + 1], zero_t[j : j + 1]
                else:
                    st, zt = row_group_params(row[None], bits, group_size, clip)
                    step_t[j], zero_t[j] = st[0], zt[0]
                c = row_group_codes(row[None], st, zt, bits, group_size)[0]
                s = st[0].repeat_interleave(group_size)[:n]
                z = zt[0].repeat_interleave(group_size)[:n]
            else:
                g = j // group_size
                if not static and j % group_size == 0:
                    g_end = min(i + group_size, i2 - i1)
                    imp = input_sq[perm[i1 + i : i1 + g_end]]
                    st, zt = row_group_params(w1[i:g_end].t(), bits, group_size, clip, imp)
                    step_t[g], zero_t[g] = st[:, 0], zt[:, 0]
                s, z = step_t[g], zero_t[g]
                c = _round_to_grid(row, s, z, bits)
            codes_t[i1 + i] = c
            err = (row - (c - z) * s) / hinv1[i, i]
            w1[i:] -= hinv1[i, i:, None] * err[None, :]
            err1[i] = err
        wt[i2:] -= h_inv[i1:i2, i2:].t() @ err1
    _check_steps(step_t)
    codes = codes_t[torch.argsort(perm)].t()
    return _pack_result(codes, step_t.t(), zero_t.t(), bits, group_size, group_dim)


# ---------------------------------------------------------------------------------------------- criterion


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> float:
    """Σ_t ‖Δ x_t‖² = trace(Δ H Δᵀ) for a weight error Δ `(N, K)` and H = Σ x xᵀ `(K, K)`: the squared error
    the layer's own output takes over the calibration tokens, without revisiting them."""
    d = delta.double()
    return float(((d @ hessian.double()) * d).sum())


def pick_layout(errors: dict[str, float]) -> str:
    """AdaDim's per-layer choice: the layout with the lower output error ("oc" on a tie)."""
    return min(GROUP_LAYOUTS, key=lambda dim: (errors[dim], dim != "oc"))


def _check_layout(group_dim: str) -> None:
    if group_dim not in GROUP_LAYOUTS:
        raise ValueError(f"group_dim={group_dim!r} is invalid for one layer; use one of {list(GROUP_LAYOUTS)}.")


def _pack_result(
    codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int, group_dim: str
) -> GroupQuantized:
    return GroupQuantized(
        codes=codes.to(torch.uint8).contiguous(),
        scale=step.half().contiguous(),
        zero=zero.half().contiguous(),
        bits=bits,
        group_size=group_size,
        group_dim=group_dim,
    )


# ------------------------------------------------------------------------------------------------ refit


def _group_sum(values: torch.Tensor, group_size: int, group_dim: str) -> torch.Tensor:
    """Sum of `(N, K)` values over each group: the adjoint of `expand_groups`."""
    n, k = values.shape
    if group_dim == "oc":
        pad = num_groups(k, group_size) * group_size - k
        return torch.nn.functional.pad(values, (0, pad)).reshape(n, -1, group_size).sum(dim=-1)
    pad = num_groups(n, group_size) * group_size - n
    return torch.nn.functional.pad(values, (0, 0, 0, pad)).reshape(-1, group_size, k).sum(dim=1)


def refit_group_params(
    quantized: GroupQuantized, weight: torch.Tensor, hessian: torch.Tensor, iterations: int = 40
) -> GroupQuantized:
    """Keep the codes, re-solve every group's scale and zero for the least output error tr(ΔW H ΔWᵀ).

    With the codes fixed, Ŵ = Q ∘ S − C (S, C = zero·scale expanded from the groups) is linear in the group
    parameters, so the best ones solve a linear least-squares problem in H's metric; preconditioned conjugate
    gradients solve it without forming the normal matrix (each step is one `(N, K) @ (K, K)` product). The new
    zero points are fractional fp16 values. Each independent unit (an output row for "oc", a group of rows for
    "ic") keeps its old parameters unless the new ones, rounded to fp16, lower its error.
    """
    g, dim = quantized.group_size, quantized.group_dim
    q = quantized.codes.float()
    w = weight.float()
    h = hessian.float()
    shape = tuple(q.shape)

    def expand(p: torch.Tensor) -> torch.Tensor:
        return expand_groups(p, g, dim, shape)

    def group_terms(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(groupsum(Q ∘ (Δ H)), −groupsum(Δ H)) of a weight difference Δ: scale and C components."""
        gh = delta @ h
        return _group_sum(q * gh, g, dim), -_group_sum(gh, g, dim)

    def apply(ds: torch.Tensor, dc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The normal operator: `group_terms(ΔŴ)` for ΔŴ = Q ∘ ΔS − ΔC."""
        return group_terms(q * expand(ds) - expand(dc))

    s0, z0 = quantized.scale.float(), quantized.zero.float()
    c0 = z0 * s0
    hd = torch.diag(h)[None, :].expand(shape)
    scale_s = (_group_sum(q * q * hd, g, dim) + 1e-12).reciprocal()  # Jacobi preconditioner
    scale_c = (_group_sum(hd, g, dim) + 1e-12).reciprocal()
    rs, rc = group_terms(w - (q * expand(s0) - expand(c0)))  # −gradient at the current parameters
    xs, xc = torch.zeros_like(s0), torch.zeros_like(c0)
    zs, zc = rs * scale_s, rc * scale_c
    ps, pc = zs.clone(), zc.clone()
    rz = float((rs * zs).sum() + (rc * zc).sum())
    for _ in range(iterations):
        if rz <= 0:
            break
        as_, ac = apply(ps, pc)
        pap = float((ps * as_).sum() + (pc * ac).sum())
        if pap <= 0:
            break
        alpha = rz / pap
        xs, xc = xs + alpha * ps, xc + alpha * pc
        rs, rc = rs - alpha * as_, rc - alpha * ac
        zs, zc = rs * scale_s, rc * scale_c
        rz_new = float((rs * zs).sum() + (rc * zc).sum())
        ps, pc = zs + (rz_new / rz) * ps, zc + (rz_new / rz) * pc
        rz = rz_new
    s1 = (s0 + xs).clamp(min=_SCALE_FLOOR).half().float()
    z1 = ((c0 + xc) / s1).half().float()
    finite = torch.isfinite(s1) & torch.isfinite(z1)
    s1, z1 = torch.where(finite, s1, s0), torch.where(finite, z1, z0)

    def unit_errors(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        delta = w - (q - expand(zero)) * expand(scale)
        per_row = ((delta @ h) * delta).sum(dim=1)
        return per_row if dim == "oc" else _group_sum(per_row[:, None], g, "ic")[:, 0]

    better = (unit_errors(s1, z1) < unit_errors(s0, z0))[:, None]  # a unit is a row of the parameters
    return _pack_result(q, torch.where(better, s1, s0), torch.where(better, z1, z0), quantized.bits, g, dim)


def quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    count: int,
    bits: int,
    group_size: int,
    group_dim: str,
    algorithm: str = "rtn",
    clip: bool = False,
    refit_rounds: int = 0,
    damp: float = 0.01,
    act_order: bool = True,
) -> GroupQuantized:
    """One layout's quantization of `weight`: RTN or GPTQ, then `refit_rounds` rounds of group-parameter refit.

    `hessian` = Σ x xᵀ over `count` calibration tokens (None: data-free RTN, no refit). Each round refits the
    scales and zeros to the current codes (`refit_group_params`); every round but the last then re-chooses the
    codes on the refitted grid (GPTQ again, or RTN), so codes and grid improve in turn.
    """
    if algorithm not in ("rtn", "gptq"):
        raise ValueError(f"algorithm={algorithm!r} is invalid; use 'rtn' or 'gptq'.")
    if hessian is None and (algorithm == "gptq" or refit_rounds):
        raise ValueError("GPTQ and the group-parameter refit need the calibration Hessian; pass `hessian`.")

    def choose_codes(grid: tuple[torch.Tensor, torch.Tensor] | None) -> GroupQuantized:
        if algorithm == "gptq":
            return quantize_gptq(weight, hessian, bits, group_size, group_dim, damp, act_order, clip, grid=grid)
        input_sq = torch.diag(hessian) / count if hessian is not None else None
        return quantize_rtn(weight, bits, group_size, group_dim, clip, input_sq, grid=grid)

    quantized = choose_codes(None)
    for round_ in range(refit_rounds):
        quantized = refit_group_params(quantized, weight, hessian)
        if round_ < refit_rounds - 1:
            quantized = choose_codes((quantized.scale, quantized.zero))
    return quantized
