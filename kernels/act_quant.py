"""Activation quantization kernels: one pass from floating-point activations to int8 codes.

Three entry points, each with its pure-PyTorch reference (the specification and the CPU path):

- `norm_quant`: RMSNorm or LayerNorm fused with the static OutlierTune quantizer. The per-channel
  steps Δ are already folded into the norm weight, so the norm output *is* the grid-domain input;
  `codes = clamp(round(norm(x) − offset))`. Replaces "norm writes bf16, each reader re-reads and
  quantizes it" with one read of x and one int8 write.
- `static_quant`: `clamp(round(x − offset))` for a static input whose norm could not be fused.
- `per_token_quant`: dynamic per-token absmax quantization, optionally after a block-Hadamard
  rotation of each row (x · blockdiag(H_B, …)). The rotation runs in the kernel as two small
  matmuls, H_B = H_B1 ⊗ H_B2, so it costs O(K·(B1+B2)) per row instead of O(K·B); for a few rows
  (decode) it is split over (row, block) programs in two kernels, so the blocks run in parallel.
- `silu_mul_per_token_quant`: the same for a gated MLP's down projection, whose input silu(gate) · up
  is computed in fp32 where the kernel loads it, so it is never written out in the model dtype.

Rounding is round-half-to-even everywhere (as `torch.round`); the kernels emulate it with floor so
they also run under TRITON_INTERPRET=1, where `libdevice.rint` is unavailable.
"""

from __future__ import annotations

import functools
import math
import os

import torch

from .dispatch import through_custom_op, uses_triton

try:
    import triton
    import triton.language as tl
except Exception:  # no triton (macOS, CPU-only installs): the references serve
    triton = None
    tl = None

TINY = 1e-8  # smallest per-token step (an all-zero row quantizes to zeros, not NaN)
NORM_KINDS = ("rms", "layer")


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


# ----------------------------------------------------------------------------------------------------
# References (the specification; the CPU path)
# ----------------------------------------------------------------------------------------------------


def _round_clamp(y: torch.Tensor, bits: int) -> torch.Tensor:
    q = qmax(bits)
    return torch.clamp(torch.round(y), -q, q).to(torch.int8)


def norm_quant_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
    kind: str,
    weight_offset: float,
    input_offset: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """Codes of `norm(x)·(weight + weight_offset) + bias − input_offset`, all in fp32."""
    xf = x.float()
    if kind == "layer":
        xf = xf - xf.mean(dim=-1, keepdim=True)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * (weight.float() + weight_offset)
    if bias is not None:
        y = y + bias.float()
    if input_offset is not None:
        y = y - input_offset.float()
    return _round_clamp(y, bits)


def static_quant_reference(x: torch.Tensor, input_offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Codes of a grid-domain input: `clamp(round(x − offset))`."""
    y = x.float()
    if input_offset is not None:
        y = y - input_offset.float()
    return _round_clamp(y, bits)


def block_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """x · blockdiag(H_block, …) along the last dimension, in fp32, H the orthonormal Sylvester Hadamard matrix.

    A fast Walsh–Hadamard transform (log2(block) butterfly passes): no matrix is built or cached, so no tensor
    outlives the call — a cached device tensor created during CUDA-graph capture would leak into the graph's
    memory pool (cudagraph trees refuse that)."""
    lead, k = x.shape[:-1], x.shape[-1]
    y = x.float().reshape(-1, block)
    half = 1
    while half < block:
        pairs = y.reshape(-1, block // (2 * half), 2, half)
        y = torch.stack((pairs[:, :, 0] + pairs[:, :, 1], pairs[:, :, 0] - pairs[:, :, 1]), dim=2)
        half *= 2
    return (y.reshape(*lead, k) * (1.0 / math.sqrt(block)))


def per_token_quant_reference(
    x: torch.Tensor, bits: int, hadamard_block: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes `(M, K)` and per-token steps `(M,)` of the (optionally rotated) rows of `x`."""
    xf = block_hadamard(x, hadamard_block) if hadamard_block > 1 else x.float()
    step = (xf.abs().amax(dim=-1) / qmax(bits)).clamp(min=TINY)
    return _round_clamp(xf / step[:, None], bits), step


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """A gated MLP's hidden activation silu(gate) · up, in fp32."""
    return torch.nn.functional.silu(gate.float()) * up.float()


def silu_mul_per_token_quant_reference(
    gate: torch.Tensor, up: torch.Tensor, bits: int, hadamard_block: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_quant_reference` of silu(gate) · up, the product taken in fp32 (not rounded to the model dtype)."""
    return per_token_quant_reference(silu_mul(gate, up), bits, hadamard_block)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _norm_quant_kernel(
    x_ptr, w_ptr, b_ptr, off_ptr, out_ptr,
    K, stride_xm, stride_om,
    eps, w_offset, QMAX,
    IS_LAYERNORM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_OFFSET: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per row: statistics pass over the row, then normalize, shift, round, clamp, store int8."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + offs, mask=offs < K, other=0.0).to(tl.float32)
        acc += x
        acc2 += x * x
    if IS_LAYERNORM:
        mean = tl.sum(acc, axis=0) / K
    else:
        mean = 0.0
    var = tl.sum(acc2, axis=0) / K - mean * mean
    rstd = 1.0 / tl.sqrt(var + eps)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        y = (x - mean) * rstd * (w + w_offset)
        if HAS_BIAS:
            y += tl.load(b_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_OFFSET:
            y -= tl.load(off_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_om + offs, _codes(y, QMAX), mask=mask)


def _static_quant_kernel(
    x_ptr, off_ptr, out_ptr, K, stride_xm, stride_om, QMAX,
    HAS_OFFSET: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid (rows, K blocks): `clamp(round(x − offset))` to int8."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    y = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_OFFSET:
        y -= tl.load(off_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, _codes(y, QMAX), mask=mask)


def _per_token_quant_kernel(
    x_ptr, up_ptr, out_ptr, step_ptr, K, stride_xm, stride_um, stride_om, QMAX, TINY_STEP,
    BLOCK_K: tl.constexpr, GATED: tl.constexpr,
):
    """One program per row: absmax pass, then quantize with step = absmax / QMAX (GATED: of silu(x) · up)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    up_row = up_ptr + row * stride_um
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        x = _load_input(x_row + offs, up_row + offs, offs < K, GATED)
        amax = tl.maximum(amax, tl.abs(x))
    step = tl.maximum(tl.max(amax, axis=0) / QMAX, TINY_STEP)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + tl.arange(0, BLOCK_K)
        mask = offs < K
        y = _load_input(x_row + offs, up_row + offs, mask, GATED) / step
        tl.store(out_ptr + row * stride_om + offs, _codes(y, QMAX), mask=mask)
    tl.store(step_ptr + row, step)


def _hadamard_per_token_quant_kernel(
    x_ptr, up_ptr, out_ptr, step_ptr, K, stride_xm, stride_um, stride_om, QMAX, TINY_STEP, NORM,
    B1: tl.constexpr, B2: tl.constexpr, LOG_B1: tl.constexpr, LOG_B2: tl.constexpr, GATED: tl.constexpr,
):
    """One program per row. Each block of B1·B2 channels, viewed as a (B1, B2) tile X, rotates to
    H_B1 · X · H_B2 (the Sylvester H_B = H_B1 ⊗ H_B2, unnormalized ±1 entries, then × NORM).
    Pass 1 finds the row's absmax of the rotated values; pass 2 recomputes them and quantizes. The dots run
    in TF32 on the GPU: the first stage is exact for bf16/fp16 inputs (±1 entries; fp32 inputs are rounded), the
    second rounds its fp32 input to a 10-bit mantissa (2^-11 relative; on H100 the step of an fp32 row moved by
    up to 9e-4 relative to the exact rotation's). GATED: the rows are silu(x) · up."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    up_row = up_ptr + row * stride_um
    h1 = _sylvester(B1, LOG_B1)
    h2 = _sylvester(B2, LOG_B2)
    tile = tl.arange(0, B1)[:, None] * B2 + tl.arange(0, B2)[None, :]
    amax = tl.zeros((B1, B2), dtype=tl.float32)
    for k0 in range(0, K, B1 * B2):
        x = _load_input(x_row + k0 + tile, up_row + k0 + tile, None, GATED)
        y = tl.dot(h1, tl.dot(x, h2))
        amax = tl.maximum(amax, tl.abs(y))
    step = tl.maximum(tl.max(tl.max(amax, axis=1), axis=0) * NORM / QMAX, TINY_STEP)
    for k0 in range(0, K, B1 * B2):
        x = _load_input(x_row + k0 + tile, up_row + k0 + tile, None, GATED)
        y = tl.dot(h1, tl.dot(x, h2)) * NORM / step
        tl.store(out_ptr + row * stride_om + k0 + tile, _codes(y, QMAX))
    tl.store(step_ptr + row, step)


def _hadamard_blocks_kernel(
    x_ptr, up_ptr, y_ptr, amax_ptr, stride_xm, stride_um, stride_ym, stride_am,
    B1: tl.constexpr, B2: tl.constexpr, LOG_B1: tl.constexpr, LOG_B2: tl.constexpr, GATED: tl.constexpr,
):
    """Split path (few rows), stage 1. Program (row, block) rotates one block as the one-program kernel does,
    stores it (unnormalized, fp32) and its absmax."""
    row = tl.program_id(0).to(tl.int64)
    k0 = tl.program_id(1) * (B1 * B2)
    tile = tl.arange(0, B1)[:, None] * B2 + tl.arange(0, B2)[None, :]
    x = _load_input(x_ptr + row * stride_xm + k0 + tile, up_ptr + row * stride_um + k0 + tile, None, GATED)
    y = tl.dot(_sylvester(B1, LOG_B1), tl.dot(x, _sylvester(B2, LOG_B2)))
    tl.store(y_ptr + row * stride_ym + k0 + tile, y)
    tl.store(amax_ptr + row * stride_am + tl.program_id(1), tl.max(tl.max(tl.abs(y), axis=1), axis=0))


def _quant_blocks_kernel(
    y_ptr, amax_ptr, out_ptr, step_ptr, NBLOCKS, stride_ym, stride_am, stride_om, QMAX, TINY_STEP, NORM,
    BLOCK: tl.constexpr, NBLOCKS_P2: tl.constexpr,
):
    """Split path, stage 2. Program (row, block): the row's step from its blocks' absmaxes, then the block's
    codes, with the one-program kernel's arithmetic (the same codes and step)."""
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    b = tl.arange(0, NBLOCKS_P2)
    amax = tl.load(amax_ptr + row * stride_am + b, mask=b < NBLOCKS, other=0.0)
    step = tl.maximum(tl.max(amax, axis=0) * NORM / QMAX, TINY_STEP)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    y = tl.load(y_ptr + row * stride_ym + offs) * NORM / step
    tl.store(out_ptr + row * stride_om + offs, _codes(y, QMAX))
    if blk == 0:
        tl.store(step_ptr + row, step)


def _load_input_impl(x_ptrs, up_ptrs, mask, GATED: tl.constexpr):
    """The quantizer's input in fp32: x, or for GATED silu(x) · up (a gated MLP's hidden activation).
    `mask` None: whole tiles, loaded unmasked."""
    if mask is None:
        x = tl.load(x_ptrs).to(tl.float32)
        if GATED:
            x = x * tl.sigmoid(x) * tl.load(up_ptrs).to(tl.float32)
    else:
        x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if GATED:
            x = x * tl.sigmoid(x) * tl.load(up_ptrs, mask=mask, other=0.0).to(tl.float32)
    return x


def _codes_impl(y, QMAX):
    """int8 codes clamp(round(y), ±QMAX), rounding half to even without libdevice.rint (the interpreter)."""
    r = tl.floor(y + 0.5)
    r = tl.where(((r - y) == 0.5) & ((r - 2.0 * tl.floor(r * 0.5)) != 0.0), r - 1.0, r)
    return tl.minimum(tl.maximum(r, -QMAX), QMAX).to(tl.int8)


def _sylvester_impl(B: tl.constexpr, LOG_B: tl.constexpr):
    """The unnormalized (B, B) Sylvester Hadamard matrix: H[i, j] = (−1)^popcount(i & j), in fp32."""
    i = tl.arange(0, B)
    a = i[:, None] & i[None, :]
    parity = tl.zeros((B, B), dtype=tl.int32)
    for b in tl.static_range(LOG_B):
        parity ^= (a >> b) & 1
    return 1.0 - 2.0 * parity.to(tl.float32)


@functools.cache
def _jit(kernel_name: str, interpret: bool):
    """`triton.jit` applied on first use, so TRITON_INTERPRET set after import still takes effect."""
    _jit_helpers(interpret)
    return triton.jit(globals()[kernel_name])


@functools.cache
def _jit_helpers(interpret: bool) -> None:
    """Jit the helpers the kernels call (in the same mode) and bind them to the names the kernels use."""
    for name in ("_codes", "_sylvester", "_load_input"):
        globals()[name] = triton.jit(globals()[f"{name}_impl"])


def _row_block(k: int) -> int:
    return min(triton.next_power_of_2(k), 4096)


def _warps(block: int) -> int:
    return 1 if _interpret_mode() else max(1, min(8, block // 512))


def _check_2d(x: torch.Tensor) -> None:
    if x.dim() != 2 or not x.is_floating_point():
        raise TypeError(f"expected a 2-D floating-point activation (tokens, channels), got {x.dtype} {tuple(x.shape)}")
    if x.stride(-1) != 1:
        raise ValueError("the activation's last dimension must be contiguous; call .contiguous() first")


def norm_quant_triton(x, weight, bias, eps, kind, weight_offset, input_offset, bits) -> torch.Tensor:
    """`norm_quant_reference` as one Triton kernel (one program per token)."""
    _check_2d(x)
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0:
        return out
    block = _row_block(k)
    _jit("_norm_quant_kernel", _interpret_mode())[(m,)](
        x, weight, bias if bias is not None else weight, input_offset if input_offset is not None else weight, out,
        k, x.stride(0), out.stride(0), float(eps), float(weight_offset), float(qmax(bits)),
        IS_LAYERNORM=kind == "layer", HAS_BIAS=bias is not None, HAS_OFFSET=input_offset is not None,
        BLOCK_K=block, num_warps=_warps(block),
    )
    return out


def static_quant_triton(x: torch.Tensor, input_offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """`static_quant_reference` as one elementwise Triton kernel."""
    _check_2d(x)
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    if m == 0:
        return out
    block = min(triton.next_power_of_2(k), 1024)
    _jit("_static_quant_kernel", _interpret_mode())[(m, triton.cdiv(k, block))](
        x, input_offset if input_offset is not None else x, out, k, x.stride(0), out.stride(0), float(qmax(bits)),
        HAS_OFFSET=input_offset is not None, BLOCK_K=block, num_warps=_warps(block),
    )
    return out


def hadamard_factors(block: int) -> tuple[int, int] | None:
    """(B1, B2) with B1·B2 = block, both ≥ 16 powers of two (the in-kernel rotation), else None."""
    if block < 256 or block & (block - 1):
        return None
    b2 = 1 << (int(math.log2(block)) // 2)
    return block // b2, b2


def per_token_quant_triton(
    x: torch.Tensor, bits: int, hadamard_block: int = 1, up: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_token_quant_reference` as one Triton kernel per call (the rotation fused when B ≥ 256); with `up`,
    `silu_mul_per_token_quant_reference(x, up, ...)`, the product formed where the kernel loads its input."""
    _check_2d(x)
    if up is not None:
        _check_2d(up)
        if up.shape != x.shape:
            raise ValueError(f"gate {tuple(x.shape)} and up {tuple(up.shape)} differ in shape")
    m, k = x.shape
    out = torch.empty((m, k), dtype=torch.int8, device=x.device)
    step = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return out, step
    factors = hadamard_factors(hadamard_block) if hadamard_block > 1 else None
    if hadamard_block > 1 and factors is None:  # too small for tl.dot tiles: rotate with torch, quantize in the kernel
        x, up = block_hadamard(x if up is None else silu_mul(x, up), hadamard_block), None
    gated = up is not None
    up, stride_um = (up, up.stride(0)) if gated else (x, 0)  # ungated: x stands in, never read
    if factors is not None:
        _hadamard_per_token_quant(x, up, stride_um, gated, out, step, bits, hadamard_block, factors)
        return out, step
    block = _row_block(k)
    _jit("_per_token_quant_kernel", _interpret_mode())[(m,)](
        x, up, out, step, k, x.stride(0), stride_um, out.stride(0), float(qmax(bits)), TINY, BLOCK_K=block,
        GATED=gated, num_warps=_warps(block),
    )
    return out, step


SPLIT_HADAMARD_MAX_M = 64  # up to this many rows the rotation runs one program per (row, block), in two kernels


def _hadamard_per_token_quant(
    x, up, stride_um: int, gated: bool, out, step, bits: int, block: int, factors: tuple[int, int]
) -> None:
    """The rotated per-token quantization (of silu(x) · up when `gated`) into `out` and `step`. Many rows:
    one program per row, two passes over its blocks. Few rows (decode), where that would leave most SMs idle: one
    program per (row, block) rotates into an fp32 scratch and records block absmaxes, then a second kernel
    quantizes each block."""
    (m, k), (b1, b2) = x.shape, factors
    rotation = dict(B1=b1, B2=b2, LOG_B1=int(math.log2(b1)), LOG_B2=int(math.log2(b2)), GATED=gated)
    num_warps = 1 if _interpret_mode() else 4
    scalars = (float(qmax(bits)), TINY, 1.0 / math.sqrt(block))
    if m > SPLIT_HADAMARD_MAX_M:
        _jit("_hadamard_per_token_quant_kernel", _interpret_mode())[(m,)](
            x, up, out, step, k, x.stride(0), stride_um, out.stride(0), *scalars, **rotation, num_warps=num_warps)
        return
    nblocks = k // block
    rotated = torch.empty((m, k), dtype=torch.float32, device=x.device)
    amax = torch.empty((m, nblocks), dtype=torch.float32, device=x.device)
    _jit("_hadamard_blocks_kernel", _interpret_mode())[(m, nblocks)](
        x, up, rotated, amax, x.stride(0), stride_um, rotated.stride(0), amax.stride(0), **rotation,
        num_warps=num_warps)
    _jit("_quant_blocks_kernel", _interpret_mode())[(m, nblocks)](
        rotated, amax, out, step, nblocks, rotated.stride(0), amax.stride(0), out.stride(0), *scalars,
        BLOCK=block, NBLOCKS_P2=triton.next_power_of_2(nblocks), num_warps=num_warps)


# ----------------------------------------------------------------------------------------------------
# Public entry points: custom ops on CUDA (opaque to torch.compile, CUDA-graph safe), references elsewhere
# ----------------------------------------------------------------------------------------------------


def norm_quant(x, weight, bias, eps, kind, weight_offset, input_offset, bits) -> torch.Tensor:
    """Int8 codes of the folded norm's output (see `norm_quant_reference`)."""
    if kind not in NORM_KINDS:
        raise ValueError(f"kind={kind!r} is invalid; allowed values: {list(NORM_KINDS)}")
    if uses_triton(x):
        if through_custom_op(x):
            return torch.ops.hf_outliertune.norm_quant(x, weight, bias, eps, kind, weight_offset, input_offset, bits)
        return norm_quant_triton(x, weight, bias, eps, kind, weight_offset, input_offset, bits)
    return norm_quant_reference(x, weight, bias, eps, kind, weight_offset, input_offset, bits)


def static_quant(x: torch.Tensor, input_offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Int8 codes of a grid-domain input (see `static_quant_reference`)."""
    if uses_triton(x):
        if through_custom_op(x):
            return torch.ops.hf_outliertune.static_quant(x, input_offset, bits)
        return static_quant_triton(x, input_offset, bits)
    return static_quant_reference(x, input_offset, bits)


def per_token_quant(x: torch.Tensor, bits: int, hadamard_block: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes and per-token steps (see `per_token_quant_reference`)."""
    if uses_triton(x):
        if through_custom_op(x):
            return torch.ops.hf_outliertune.per_token_quant(x, bits, hadamard_block)
        return per_token_quant_triton(x, bits, hadamard_block)
    return per_token_quant_reference(x, bits, hadamard_block)


def silu_mul_per_token_quant(
    gate: torch.Tensor, up: torch.Tensor, bits: int, hadamard_block: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Int8 codes and per-token steps of silu(gate) · up (see `silu_mul_per_token_quant_reference`)."""
    if uses_triton(gate):
        if through_custom_op(gate):
            return torch.ops.hf_outliertune.silu_mul_per_token_quant(gate, up, bits, hadamard_block)
        return per_token_quant_triton(gate, bits, hadamard_block, up=up)
    return silu_mul_per_token_quant_reference(gate, up, bits, hadamard_block)


@torch.library.custom_op(
    "hf_outliertune::norm_quant",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor? bias, float eps, str kind, float weight_offset, Tensor? input_offset, "
    "int bits) -> Tensor",
)
def _norm_quant_op(x, weight, bias, eps, kind, weight_offset, input_offset, bits):
    return norm_quant_triton(x, weight, bias, eps, kind, weight_offset, input_offset, bits)


@_norm_quant_op.register_fake
def _(x, weight, bias, eps, kind, weight_offset, input_offset, bits):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op(
    "hf_outliertune::static_quant", mutates_args=(), schema="(Tensor x, Tensor? input_offset, int bits) -> Tensor"
)
def _static_quant_op(x, input_offset, bits):
    return static_quant_triton(x, input_offset, bits)


@_static_quant_op.register_fake
def _(x, input_offset, bits):
    return x.new_empty(x.shape, dtype=torch.int8)


@torch.library.custom_op(
    "hf_outliertune::per_token_quant", mutates_args=(), schema="(Tensor x, int bits, int hadamard_block) -> (Tensor, Tensor)"
)
def _per_token_quant_op(x, bits, hadamard_block):
    return per_token_quant_triton(x, bits, hadamard_block)


@_per_token_quant_op.register_fake
def _(x, bits, hadamard_block):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty(x.shape[:1], dtype=torch.float32)


@torch.library.custom_op(
    "hf_outliertune::silu_mul_per_token_quant",
    mutates_args=(),
    schema="(Tensor gate, Tensor up, int bits, int hadamard_block) -> (Tensor, Tensor)",
)
def _silu_mul_per_token_quant_op(gate, up, bits, hadamard_block):
    return per_token_quant_triton(gate, bits, hadamard_block, up=up)


@_silu_mul_per_token_quant_op.register_fake
def _(gate, up, bits, hadamard_block):
    return gate.new_empty(gate.shape, dtype=torch.int8), gate.new_empty(gate.shape[:1], dtype=torch.float32)
