"""Weight-only low-bit matmul with the dequantization fused into the kernel.

    y = x · Wᵀ + bias,   W[n, k] = (q[n, k] − zero) · scale   (fp32),

with `q` the 2/3/4/8-bit codes packed as `kernels/packing.py` describes and `scale`/`zero` fp16 per group,
grouped along K (`group_dim="oc"`, indexed `[n, k // g]`) or along N (`"ic"`, indexed `[n // g, k]`).

`lowbit_matmul_reference` is the specification (pure PyTorch, any device, differentiable w.r.t. x).
Triton kernels implement it on the GPU; `lowbit_matmul` dispatches by device and M:

- `_gemv_kernel` (decode: M ≤ 2 per-OC, ≤ 4 per-IC): CUDA-core GEMV, one program column per row of x. Each
  thread owns a chunk of K (`UNITS` packed words; at 3 bits, 32-code blocks of both planes) for all `BLOCK_N`
  rows of its program, loaded as 16-byte vectors. One shift and one LOP3 put two codes into an fp16 pair
  `v = 1 + q / 2^b` (no int→float conversion), each half widens to fp32 and meets its x in one FMA, so
  Σ q·x = 2^b·(Σ v·x − Σ x). The group's scale and zero are
  applied once per chunk: Σ (q − z)·s·x = s·(Σ q·x − z·Σ x). Per-IC scales vary along K, so they scale x instead
  (x' = s·x, with Σ z·x' the same for every row), which needs all rows of a program in one group
  (BLOCK_N ≤ g). For bf16 x (`HALF`), the pair is v/16 and meets an fp16 pair of x in one HFMA2, summed in
  fp16 over a chunk before fp32: a third fewer instructions a code, about 1e-3 relative error (below the bf16
  output's rounding); fp16 and fp32 x keep fp32 sums. Launch configs are pre-tuned per shape
  (`GEMV_PRETUNED`), not autotuned.
- `_mma_kernel` (larger M): tiled tensor-core GEMM, x tile · dequantized weight tileᵀ, with the per-element
  dequantization `v·S + C` in the K loop; narrow 16-row tiles with long K steps for decode-sized M, 128/256-row
  tiles for prefill.
- Prefill (M ≥ `PREFILL_MIN_M`, half-precision x): `_dequant_kernel` writes the dense weight in one
  memory-bound pass and cuBLAS multiplies; used instead of `_mma_kernel` when a one-time timing per shape finds
  it faster (on an H100 it is at M = 2048, where the fused kernel cannot yet overlap dequantization and MMA).

The fused kernels read the packed int32 rows as stored (K-major, 16-byte loads) and never materialize W.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
from typing import Callable

import torch

from .dispatch import through_custom_op, uses_triton
from .packing import check_bits, check_group_params, check_packed, dequantize_packed

# triton is optional: it is absent on macOS and on CPU-only installs, where the reference serves.
try:
    import triton
    import triton.language as tl
except Exception as exc:  # ImportError, or a broken install: either way the reference path stays usable
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR: Exception | None = exc
else:
    _TRITON_IMPORT_ERROR = None

X_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ONE_BITS = 0x3F800000  # IEEE-754 bits of 1.0f: OR-ing a field into its mantissa gives 1 + field / 2^23


# ----------------------------------------------------------------------------------------------------
# Reference (the specification; the CPU path)
# ----------------------------------------------------------------------------------------------------


def lowbit_matmul_reference(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ dequantize_packed(...).T + bias` in fp32 (fp64 for fp64 x), returned in x's dtype."""
    check_inputs(x, packed, scale, zero, bits, group_size, group_dim, bias, allow_fp64=True)
    w = dequantize_packed(packed, scale, zero, bits, group_size, group_dim, x.shape[1])
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    y = x.to(compute) @ w.to(device=x.device, dtype=compute).t()
    if bias is not None:
        y = y + bias.to(compute)
    return y.to(x.dtype)


def check_inputs(x, packed, scale, zero, bits, group_size, group_dim, bias, allow_fp64: bool = False) -> None:
    """Shapes, dtypes, layout and devices of a call; raises with the problem and the fix."""
    dtypes = X_DTYPES + ((torch.float64,) if allow_fp64 else ())
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in dtypes:
        raise TypeError(f"x must be a 2-D floating tensor (M, K) of dtype in {list(dtypes)}, got {_describe(x)}; "
                        "flatten leading dimensions with x.reshape(-1, K)")
    check_bits(bits)
    check_packed(packed, bits, x.shape[1])
    check_group_params(scale, zero, group_size, group_dim, packed.shape[0], x.shape[1])
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or tuple(bias.shape) != (packed.shape[0],):
            raise ValueError(f"bias must be a floating tensor of shape (N,) = ({packed.shape[0]},), got {_describe(bias)}")
    devices = {t.device for t in (x, packed, scale, zero, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}; move them with .to()")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def lowbit_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    bits: int,
    group_size: int,
    group_dim: str,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dispatch: on CUDA (triton importable) the `hf_outliertune::lowbit_matmul` custom op while torch.compile
    traces or a gradient flows (its autograd formula), the Triton entry point directly otherwise (the op's
    dispatch costs host time that bounds eager decode) — else the reference."""
    if uses_triton(x):
        if through_custom_op(x, differentiable=True):
            return torch.ops.hf_outliertune.lowbit_matmul(x, packed, scale, zero, bits, group_size, group_dim, bias)
        return lowbit_matmul_triton(x, packed, scale, zero, bits, group_size, group_dim, bias)
    return lowbit_matmul_reference(x, packed, scale, zero, bits, group_size, group_dim, bias)


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Plain functions here; `_kernels()` applies `triton.jit` on first use, so that
# TRITON_INTERPRET=1 set after this module was imported (tests) still takes effect. The helpers are
# jitted in the same mode and bound to the names the kernels call (`_spread3`, ...).
# ----------------------------------------------------------------------------------------------------


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _spread3_impl(w, D0: tl.constexpr, D1: tl.constexpr, V: tl.constexpr):
    """(D0, D1) → (D0, D1, V): V copies along a new innermost dimension that stays in the same thread."""
    r = tl.join(w, w)
    if V >= 4:
        r = tl.join(r, r)
    if V >= 8:
        r = tl.join(r, r)
    if V >= 16:
        r = tl.join(r, r)
    if V >= 32:
        r = tl.join(r, r)
    return tl.reshape(r, (D0, D1, V))


def _spread4_impl(w, D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr, V: tl.constexpr):
    """(D0, D1, D2) → (D0, D1, D2, V), as `_spread3` (joins keep the new dimension in-thread)."""
    r = tl.join(w, w)
    if V >= 4:
        r = tl.join(r, r)
    if V >= 8:
        r = tl.join(r, r)
    if V >= 16:
        r = tl.join(r, r)
    if V >= 32:
        r = tl.join(r, r)
    return tl.reshape(r, (D0, D1, D2, V))


def _fields_impl(w, BITS: tl.constexpr, V: tl.constexpr, TOP: tl.constexpr):
    """V copies (last dim) of uint32 words → copy j rotated so field j (bits [j·BITS, (j+1)·BITS)) starts at bit
    TOP. Callers mask the field out with `_select`; after that mask the compiler reduces the rotation to a
    single shift."""
    r = ((TOP - tl.arange(0, V) * BITS) & 31).to(tl.uint32)
    return (w << r) | (w >> ((32 - r) & 31))


def _select_impl(f, MASK: tl.constexpr, c, USE_ASM: tl.constexpr):
    """(f & MASK) | c for uint32 tensors: one LOP3 on the GPU, where ptxas would emit an AND and an OR."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,r,r",
            [f, tl.full(f.shape, MASK, tl.uint32), c],
            dtype=tl.uint32, is_pure=True, pack=1,
        )
    return (f & MASK) | c


def _rotl_impl(w, R: tl.constexpr):
    """uint32 words rotated left by the constant R (one funnel shift; a plain shift once masked)."""
    if R == 0:
        return w
    return (w << R) | (w >> (32 - R))


def _take_impl(t, D0: tl.constexpr, D1: tl.constexpr, N: tl.constexpr, I: tl.constexpr):
    """Element I of the last dimension (size N ≤ 16, held in-thread) of a (D0, D1, N) tensor: splits only."""
    if N >= 2:
        a, b = tl.split(tl.reshape(t, (D0, D1, N // 2, 2)))
        t = b if I % 2 == 1 else a
    if N >= 4:
        a, b = tl.split(tl.reshape(t, (D0, D1, N // 4, 2)))
        t = b if (I // 2) % 2 == 1 else a
    if N >= 8:
        a, b = tl.split(tl.reshape(t, (D0, D1, N // 8, 2)))
        t = b if (I // 4) % 2 == 1 else a
    if N >= 16:
        a, b = tl.split(tl.reshape(t, (D0, D1, 1, 2)))
        t = b if (I // 8) % 2 == 1 else a
    return tl.reshape(t, (D0, D1))


def _halves_impl(p, USE_ASM: tl.constexpr):
    """uint32 words holding two fp16 values → (low half, high half) as fp32 tensors."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "{.reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.f32.f16 $0, lo; cvt.f32.f16 $1, hi;}",
            "=r,=r,r", [p], dtype=(tl.float32, tl.float32), is_pure=True, pack=1,
        )
    lo = (p & 0xFFFF).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    hi = (p >> 16).to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


def _pack_half2_impl(lo, hi, USE_ASM: tl.constexpr):
    """fp32 tensors → uint32 words holding fp16(lo) in the low half and fp16(hi) in the high half."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "cvt.rn.f16x2.f32 $0, $2, $1;", "=r,r,r", [lo, hi], dtype=tl.uint32, is_pure=True, pack=1,
        )
    return (lo.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32)
            | (hi.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.uint32) << 16))


def _hfma2_impl(a, b, c, USE_ASM: tl.constexpr):
    """a·b + c on uint32 words holding fp16 pairs, lane by lane, rounded to fp16 (one HFMA2 on the GPU)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "fma.rn.f16x2 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.uint32, is_pure=True, pack=1,
        )
    a_lo, a_hi = _halves(a, False)
    b_lo, b_hi = _halves(b, False)
    c_lo, c_hi = _halves(c, False)
    return _pack_half2(a_lo * b_lo + c_lo, a_hi * b_hi + c_hi, False)


def _hadd2_impl(a, b):
    """a + b on uint32 words holding fp16 pairs, a reduction's combine function (one HADD2)."""
    return tl.inline_asm_elementwise("add.rn.f16x2 $0, $1, $2;", "=r,r,r", [a, b], dtype=tl.uint32, is_pure=True,
                                     pack=1)


def _hadd2_ref_impl(a, b):
    """`_hadd2` without inline assembly (the interpreter)."""
    a_lo, a_hi = _halves(a, False)
    b_lo, b_hi = _halves(b, False)
    return _pack_half2(a_lo + b_lo, a_hi + b_hi, False)


def _gemv_load_impl(
    x_row, stride_xk, w_rows, s_row, z_row, stride_s1, k0, K, KW,
    BITS: tl.constexpr, PER_IC: tl.constexpr, MASKED: tl.constexpr,
    NCHUNK: tl.constexpr, UNITS: tl.constexpr,
):
    """One GEMV step's raw operands for chunks [k0, k0 + NCHUNK·CHUNK) of K: x (and per-IC s, z) as
    (CHUNK / 8, NCHUNK, 8) 16-byte vectors, and the packed words wa, wb as (BLOCK_N, NCHUNK, words).

    bits 2/4/8: wa = wb = UNITS words a chunk; 3 bits: wa = UNITS bit-0 words, wb = 2·UNITS (q >> 1) words.
    The chunk index is the second-fastest dimension of every load, so that triton spreads the chunks over the
    threads and keeps each chunk's vectors (and every row) in one thread: no layout conversion follows.
    Chunks at or past K load zeros (masked), so a prefetch beyond the last step is free.
    """
    P: tl.constexpr = 32 if BITS == 3 else 32 // BITS  # codes a unit: a word, or 32 codes of both 3-bit planes
    CHUNK: tl.constexpr = UNITS * P
    c = tl.arange(0, NCHUNK)
    kx = k0 + tl.arange(0, CHUNK // 8)[:, None, None] * 8 + c[None, :, None] * CHUNK + tl.arange(0, 8)[None, None, :]
    if MASKED:
        x = tl.load(x_row + kx * stride_xk, mask=kx < K, other=0.0)
    else:
        x = tl.load(x_row + kx * stride_xk)
    if PER_IC:
        if MASKED:
            s = tl.load(s_row + kx * stride_s1, mask=kx < K, other=0.0)
            z = tl.load(z_row + kx * stride_s1, mask=kx < K, other=0.0)
        else:
            s = tl.load(s_row + kx * stride_s1)
            z = tl.load(z_row + kx * stride_s1)
    else:
        s = x
        z = x
    if BITS == 3:
        ia = k0 // 32 + c[:, None] * UNITS + tl.arange(0, UNITS)[None, :]  # bit-0 words
        ib = k0 // 16 + c[:, None] * (2 * UNITS) + tl.arange(0, 2 * UNITS)[None, :]  # (q >> 1) words
        if MASKED:
            wa = tl.load(w_rows + ia[None, :, :], mask=(ia * 32 < K)[None, :, :], other=0)
            wb = tl.load(w_rows + KW + ib[None, :, :], mask=(ib * 16 < K)[None, :, :], other=0)
        else:
            wa = tl.load(w_rows + ia[None, :, :])
            wb = tl.load(w_rows + KW + ib[None, :, :])
    else:
        iw = k0 // P + c[:, None] * UNITS + tl.arange(0, UNITS)[None, :]
        if MASKED:
            wa = tl.load(w_rows + iw[None, :, :], mask=(iw * P < K)[None, :, :], other=0)
        else:
            wa = tl.load(w_rows + iw[None, :, :])
        wb = wa
    return x, s, z, wa, wb


def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    N, K, KW, GROUP_SHIFT,
    stride_xm, stride_xk, stride_wn, stride_s0, stride_s1, stride_ym,
    BITS: tl.constexpr,
    PER_IC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows a program; every thread works on all of them
    NCHUNK: tl.constexpr,  # chunks of K a step, one or two a thread
    UNITS: tl.constexpr,  # words a chunk (bits 2/4/8), or 32-code blocks of the two planes (3 bits)
    PREFETCH: tl.constexpr,  # load step i+1 before computing step i
    HALF: tl.constexpr,  # bf16 x: products summed in fp16 pairs (HFMA2) before fp32 (fp16/fp32 x: ignored)
):
    """y[m, rows] for one row m of x and BLOCK_N weight rows, stepping through K NCHUNK chunks at a time."""
    P: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    CHUNK: tl.constexpr = UNITS * P
    STEP: tl.constexpr = NCHUNK * CHUNK
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = (rows % N).to(tl.int64)  # rows past N wrap around; their results are masked at the store
    c = tl.arange(0, NCHUNK)
    x_row = x_ptr + m * stride_xm
    w_rows = w_ptr + rows_w[:, None, None] * stride_wn
    s_row = s_ptr
    z_row = z_ptr
    if PER_IC:
        grp_ic = (pid * BLOCK_N) >> GROUP_SHIFT  # every row of the block lies in this group (BLOCK_N ≤ group)
        s_row = s_ptr + grp_ic * stride_s0
        z_row = z_ptr + grp_ic * stride_s0
    HALF_ON: tl.constexpr = HALF and x_ptr.dtype.element_ty == tl.bfloat16
    # a pair of fp16 1.0; HALF: of 2^-4, so that the codes' pairs are v / 16 and fp16 sums of v·x stay finite
    ones = tl.full((BLOCK_N, NCHUNK, UNITS), 0x2C002C00 if HALF_ON else 0x3C003C00, tl.uint32)
    acc = tl.zeros((BLOCK_N, NCHUNK), dtype=tl.float32)
    acc_x = tl.zeros((NCHUNK,), dtype=tl.float32)  # per-IC: the row-independent terms
    if PREFETCH:  # software pipelining by hand: the next step's loads are in flight during this step's math
        nxt = _gemv_load(x_row, stride_xk, w_rows, s_row, z_row, stride_s1, 0, K, KW, BITS, PER_IC, True,
                         NCHUNK, UNITS)
    for k0 in range(0, K, STEP):
        if PREFETCH:
            x, s, z, wa, wb = nxt
            nxt = _gemv_load(x_row, stride_xk, w_rows, s_row, z_row, stride_s1, k0 + STEP, K, KW, BITS, PER_IC,
                             True, NCHUNK, UNITS)
        else:
            x, s, z, wa, wb = _gemv_load(x_row, stride_xk, w_rows, s_row, z_row, stride_s1, k0, K, KW, BITS,
                                         PER_IC, not EVEN_K, NCHUNK, UNITS)
        # x: (CHUNK / 8, NCHUNK, 8) → (NCHUNK, CHUNK), all of a chunk in its thread
        x = tl.reshape(tl.permute(x.to(tl.float32), (1, 0, 2)), (NCHUNK, CHUNK))
        if PER_IC:
            # Per-IC scales vary along K: fold them into x (x' = s·x); Σ z·x' is the same for every row.
            x = x * tl.reshape(tl.permute(s.to(tl.float32), (1, 0, 2)), (NCHUNK, CHUNK))
            zx = tl.sum(x * tl.reshape(tl.permute(z.to(tl.float32), (1, 0, 2)), (NCHUNK, CHUNK)), axis=1)
        xs = tl.sum(x, axis=1)
        qx = _gemv_qx_pairs(wa, wb, x, xs, ones, BITS, BLOCK_N, NCHUNK, UNITS, USE_ASM, HALF_ON)
        if PER_IC:
            acc += qx
            acc_x += zx
        else:
            # Per-OC: one scale and zero per (row, chunk): Σ (q − z)·s·x = s·(Σ q·x − z·Σx).
            kc = k0 + c * CHUNK
            sp = rows_w[:, None] * stride_s0 + (kc >> GROUP_SHIFT)[None, :] * stride_s1
            if EVEN_K:
                sc = tl.load(s_ptr + sp).to(tl.float32)
                zc = tl.load(z_ptr + sp).to(tl.float32)
            else:
                sc = tl.load(s_ptr + sp, mask=(kc < K)[None, :], other=0.0).to(tl.float32)
                zc = tl.load(z_ptr + sp, mask=(kc < K)[None, :], other=0.0).to(tl.float32)
            acc += sc * (qx - zc * xs[None, :])
    if PER_IC:
        y = tl.sum(acc - acc_x[None, :], axis=1)
    else:
        y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_w).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


def _gemv_qx_pairs_impl(wa, wb, x, xs, ones, BITS: tl.constexpr, BLOCK_N: tl.constexpr, NCHUNK: tl.constexpr,
                        UNITS: tl.constexpr, USE_ASM: tl.constexpr, HALF: tl.constexpr):
    """Σ_chunk q·x per (row, chunk) through fp16 pairs (bits 2/3/4/8): wa, wb packed words (BLOCK_N, NCHUNK, ·),
    x (NCHUNK, CHUNK) fp32 and xs its chunk sums.

    HALF: `ones` holds fp16 2^-4, so the pairs are v/16; each meets an fp16 pair of x in one HFMA2, and the
    sums stay in fp16 over a chunk's units (at most 16 pairs a lane, so |x| < 32752 stays finite) before they
    join the fp32 sum: relative error about 1e-3, below a bf16 output's rounding."""
    P: tl.constexpr = 32 if BITS == 3 else 32 // BITS
    H: tl.constexpr = P // 2  # code pairs a unit
    SCALE: tl.constexpr = 1 << BITS
    FLUSH: tl.constexpr = 8 if H > 8 else H  # HALF: pairs a lane sums in fp16 before they join the fp32 sum
    # x as the kernel pairs codes: unit u holds codes u·P + j (low halves) and u·P + H + j (high halves)
    x_lo, x_hi = tl.split(tl.permute(tl.reshape(x, (NCHUNK, UNITS, 2, H)), (0, 1, 3, 2)))
    if HALF:
        xp = _pack_half2(x_lo, x_hi, USE_ASM)
        p16 = tl.zeros((BLOCK_N, NCHUNK, UNITS), dtype=tl.uint32)  # fp16 pairs: Σ (v/16)·x a lane
        p = tl.zeros((BLOCK_N, NCHUNK), dtype=tl.float32)
    else:
        p = tl.zeros((BLOCK_N, NCHUNK, UNITS), dtype=tl.float32)
    # Pair j: one shift and one LOP3 put two codes into an fp16 pair v = 1 + q / 2^b (no int→float
    # conversion), each half widens to fp32 and meets its x in one FMA (HALF: the pair meets x's pair in one
    # HFMA2): p = Σ_chunk v·x per row and Σ q·x = 2^b·(p − Σx).
    if BITS == 3:
        # A unit is 32 codes: a bit-0 word (code k at bit k) and two (q >> 1) words, codes 0-15 and 16-31.
        # Regrouped by halves, 2-bit field j of `r_lo` / `r_hi` is codes j / 8 + j (low) and 16 + j /
        # 24 + j (high), which the bit-0 word holds at bits k and k + 16: pair j is codes j and j + 16.
        w0 = wa.to(tl.uint32, bitcast=True)
        w1a, w1b = tl.split(tl.reshape(wb.to(tl.uint32, bitcast=True), (BLOCK_N, NCHUNK, UNITS, 2)))
        r_lo = (w1a & 0xFFFF) | (w1b << 16)
        r_hi = (w1a >> 16) | (w1b & 0xFFFF0000)
    else:
        w = wa.to(tl.uint32, bitcast=True)
    for j in tl.static_range(H):
        if BITS == 3:
            if j < 8:
                f1 = _rotl(r_lo, (8 - 2 * j) & 31)
            else:
                f1 = _rotl(r_hi, (24 - 2 * j) & 31)
            hi = _select(f1, 0x03000300, ones, USE_ASM)  # (q >> 1) at bits 8-9 of each half
            pairs = _select(_rotl(w0, (7 - j) & 31), 0x00800080, hi, USE_ASM)  # bit 0 at bit 7
        else:
            pairs = _select(_rotl(w, (10 - BITS - j * BITS) & 31), (((1 << BITS) - 1) << (10 - BITS)) * 0x10001,
                            ones, USE_ASM)
        if HALF:
            p16 = _hfma2(pairs, _take(xp, NCHUNK, UNITS, H, j)[None, :, :], p16, USE_ASM)
            if (j + 1) % FLUSH == 0:  # the chunk's units summed in fp16, then the two halves in fp32
                if USE_ASM:
                    s_lo, s_hi = _halves(tl.reduce(p16, 2, _hadd2), True)
                else:
                    s_lo, s_hi = _halves(tl.reduce(p16, 2, _hadd2_ref), False)
                p += s_lo + s_hi
                p16 = tl.zeros((BLOCK_N, NCHUNK, UNITS), dtype=tl.uint32)
        else:
            v_lo, v_hi = _halves(pairs, USE_ASM)
            p += v_lo * _take(x_lo, NCHUNK, UNITS, H, j)[None, :, :]
            p += v_hi * _take(x_hi, NCHUNK, UNITS, H, j)[None, :, :]
    if HALF:
        qx = SCALE * (16.0 * p - xs[None, :])
    else:
        qx = SCALE * (tl.sum(p, axis=2) - xs[None, :])
    return qx


def _dequant_tile_impl(
    w_rows, s_ptr, z_ptr, rows_w, grp_ic, k0, K, KW, one, stride_s0, stride_s1,
    BITS: tl.constexpr, PER_IC: tl.constexpr, GROUP_K: tl.constexpr, EVEN_K: tl.constexpr, USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The fp32 weights (q − z)·s of rows `rows_w` (w_rows = their packed-row pointers), codes [k0, k0 + BLOCK_K).

    Codes unpack to v = 1 + q / 2^BITS (one shift and one LOP3 a code), then w = v·S + C with S = 2^BITS·s and
    C = −(2^BITS + z)·s: one FMA. Per-OC groups smaller than BLOCK_K are handled as G sub-tiles along K.
    """
    V: tl.constexpr = 32 // BITS if BITS != 3 else 32
    SCALE: tl.constexpr = 1 << BITS
    G: tl.constexpr = BLOCK_K // GROUP_K if (GROUP_K > 0 and GROUP_K < BLOCK_K) else 1
    offs_k = tl.arange(0, BLOCK_K)
    ones = tl.full((BLOCK_N, BLOCK_K), 0, tl.uint32) + one
    if BITS == 3:
        NB: tl.constexpr = BLOCK_K // 32
        w0_offs = k0 // 32 + tl.arange(0, NB)
        w1_offs = KW + k0 // 16 + tl.arange(0, 2 * NB)
        if EVEN_K:
            w0 = tl.load(w_rows + w0_offs[None, :])
            w1 = tl.load(w_rows + w1_offs[None, :])
        else:
            w0 = tl.load(w_rows + w0_offs[None, :], mask=(k0 + tl.arange(0, NB) * 32)[None, :] < K, other=0)
            w1 = tl.load(w_rows + w1_offs[None, :], mask=(k0 + tl.arange(0, 2 * NB) * 16)[None, :] < K, other=0)
        f0 = _fields(_spread3(w0.to(tl.uint32, bitcast=True), BLOCK_N, NB, 32), 1, 32, 20)
        w1 = tl.reshape(w1.to(tl.uint32, bitcast=True), (BLOCK_N, NB, 2))
        f1 = tl.reshape(_fields(_spread4(w1, BLOCK_N, NB, 2, 16), 2, 16, 21), (BLOCK_N, BLOCK_K))
        vb = _select(tl.reshape(f0, (BLOCK_N, BLOCK_K)), 1 << 20, _select(f1, 3 << 21, ones, USE_ASM), USE_ASM)
    else:
        NW: tl.constexpr = BLOCK_K // V
        w_offs = k0 // V + tl.arange(0, NW)
        if EVEN_K:
            wd = tl.load(w_rows + w_offs[None, :])
        else:
            wd = tl.load(w_rows + w_offs[None, :], mask=(k0 + tl.arange(0, NW) * V)[None, :] < K, other=0)
        f = _fields(_spread3(wd.to(tl.uint32, bitcast=True), BLOCK_N, NW, V), BITS, V, 23 - BITS)
        vb = _select(tl.reshape(f, (BLOCK_N, BLOCK_K)), ((1 << BITS) - 1) << (23 - BITS), ones, USE_ASM)
    v = vb.to(tl.float32, bitcast=True)
    if PER_IC:
        kk = k0 + offs_k
        sp = s_ptr + grp_ic * stride_s0 + kk * stride_s1
        zp = z_ptr + grp_ic * stride_s0 + kk * stride_s1
        if EVEN_K:
            s = tl.load(sp).to(tl.float32)
            z = tl.load(zp).to(tl.float32)
        else:
            s = tl.load(sp, mask=kk < K, other=0.0).to(tl.float32)
            z = tl.load(zp, mask=kk < K, other=0.0).to(tl.float32)
        return v * (SCALE * s)[None, :] - ((SCALE + z) * s)[None, :]
    if GROUP_K > 0:
        g_idx = k0 // GROUP_K + tl.arange(0, G)
    else:
        g_idx = tl.zeros((G,), dtype=tl.int32)  # one group spans the whole row
    sp = rows_w[:, None] * stride_s0 + g_idx[None, :] * stride_s1
    if EVEN_K:
        s = tl.load(s_ptr + sp).to(tl.float32)
        z = tl.load(z_ptr + sp).to(tl.float32)
    else:
        gm = (g_idx * GROUP_K < K)[None, :]
        s = tl.load(s_ptr + sp, mask=gm, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + sp, mask=gm, other=0.0).to(tl.float32)
    v3 = tl.reshape(v, (BLOCK_N, G, BLOCK_K // G))
    w = v3 * (SCALE * s)[:, :, None] - ((SCALE + z) * s)[:, :, None]
    return tl.reshape(w, (BLOCK_N, BLOCK_K))


def _mma_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    M, N, K, KW, GROUP, one_bits,
    stride_xm, stride_xk, stride_wn, stride_s0, stride_s1, stride_ym,
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotune keys only
    BITS: tl.constexpr,
    PER_IC: tl.constexpr,
    GROUP_K: tl.constexpr,  # per-OC: the group size, or 0 when one group spans the whole row
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    DOT_FP32: tl.constexpr,  # fp32 x, or the interpreter (whose bf16 arithmetic is wrong): an exact fp32 dot
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """y tile = x tile · (dequantized weight tile)ᵀ, accumulated in fp32 over K steps of BLOCK_K."""
    pid = tl.program_id(axis=0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    rows_x = (offs_m % M).to(tl.int64)
    rows_w = (offs_n % N).to(tl.int64)
    one = one_bits.to(tl.uint32)
    x_ptrs = x_ptr + rows_x[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_rows = w_ptr + rows_w[:, None] * stride_wn
    grp_ic = (pid_n * BLOCK_N) // GROUP  # per-IC: BLOCK_N ≤ GROUP (or one group), one group of rows a tile
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs)
        else:
            x = tl.load(x_ptrs, mask=(k0 + offs_k)[None, :] < K, other=0.0)
        w = _dequant_tile(w_rows, s_ptr, z_ptr, rows_w, grp_ic, k0, K, KW, one, stride_s0, stride_s1,
                          BITS, PER_IC, GROUP_K, EVEN_K, USE_ASM, BLOCK_N, BLOCK_K)
        w = w.to(x.dtype)  # the tensor-core operand precision (a no-op for fp32 x)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K * stride_xk

    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_w).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _dequant_kernel(
    w_ptr, s_ptr, z_ptr, out_ptr,
    N, K, KW, GROUP, one_bits,
    stride_wn, stride_s0, stride_s1, stride_on,
    BITS: tl.constexpr,
    PER_IC: tl.constexpr,
    GROUP_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """out[n, k] = (q − z)·s for a BLOCK_N × BLOCK_K tile, in out's dtype (the prefill path's dense weight)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = (offs_n % N).to(tl.int64)
    k0 = pid_k * BLOCK_K
    w = _dequant_tile(w_ptr + rows_w[:, None] * stride_wn, s_ptr, z_ptr, rows_w, (pid_n * BLOCK_N) // GROUP, k0, K,
                      KW, one_bits.to(tl.uint32), stride_s0, stride_s1,
                      BITS, PER_IC, GROUP_K, EVEN_K, USE_ASM, BLOCK_N, BLOCK_K)
    offs_k = k0 + tl.arange(0, BLOCK_K)
    out = out_ptr + offs_n[:, None].to(tl.int64) * stride_on + offs_k[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=(offs_n[:, None] < N) & (offs_k[None, :] < K))


# ----------------------------------------------------------------------------------------------------
# Configs, autotuning and launch
# ----------------------------------------------------------------------------------------------------

# Rows of x up to which the CUDA-core GEMV (one program column per row) beats the tensor-core kernel on an
# H100 at Llama-3-8B shapes, W4/W3 g128 (docs/lowbit_gemv_small_m_h100.json): per-IC tiles pay more for their
# per-column scales, so the GEMV serves per-IC a little longer.
GEMV_MAX_M = {"oc": 2, "ic": 4}


# GEMV launch configs (BLOCK_N, NCHUNK, UNITS, num_warps, PREFETCH, HALF): BLOCK_N rows a program, all of
# them in every thread; NCHUNK chunks of UNITS units (words; 32-code blocks at 3 bits) a step, one or two
# chunks a thread; HALF: fp16-pair sums for bf16 x. Pre-tuned per (bits, layout, K, N) on an H100
# (`bench/lowbit_gemm.py --sweep`, docs/lowbit_gemv_half_sweep_h100.json); other shapes take their bit
# width's default.
# 8 bits: swept at the Llama-3 lm_head (4096×128256, `embedding_bits=8`): 2 rows and one warp a program, 179 µs
# against 217 µs for the 4-bit-like tile at M = 1 (bf16 370 µs).
GEMV_DEFAULT = {2: (4, 64, 2, 2, False, True), 3: (4, 64, 1, 2, False, True), 4: (4, 64, 4, 2, False, True),
                8: (2, 64, 4, 1, False, True)}
GEMV_PRETUNED: dict[tuple, tuple] = {  # H100 sweep at g128, 2026-11-24
    (4, "ic", 4096, 4096): (4, 128, 2, 4, False, True), (4, "ic", 4096, 6144): (4, 128, 1, 4, False, True),
    (4, "ic", 4096, 14336): (4, 128, 2, 4, False, True), (4, "ic", 14336, 4096): (4, 128, 2, 4, False, True),
}
GEMV_CANDIDATES = [(4, 64, 4, 2, False, True), (4, 64, 2, 2, False, True), (4, 64, 1, 2, False, True),
                   (4, 128, 1, 4, False, True), (4, 128, 2, 4, False, True), (8, 128, 2, 4, False, True),
                   (2, 64, 4, 2, False, True), (4, 32, 4, 1, False, True), (4, 64, 4, 2, False, False),
                   (4, 64, 1, 2, False, False), (4, 128, 1, 4, False, False)]


def gemv_unit(bits: int) -> int:
    """Codes of K in one GEMV unit: a packed word (bits 2/4/8), or 32 codes of both planes (3 bits)."""
    return 32 if bits == 3 else 32 // bits


def gemv_min_units(bits: int) -> int:
    """Fewest units a chunk: x is loaded as 8-element (16-byte) vectors, so a chunk holds at least 8 codes."""
    return max(1, 8 // gemv_unit(bits))


def gemv_min_chunk(bits: int) -> int:
    """Fewest codes of K a GEMV chunk holds; per-OC groups must be a multiple of it."""
    return gemv_min_units(bits) * gemv_unit(bits)


def _gemv_fits(cfg: tuple, bits: int, group_size: int, per_ic: bool, k: int, n: int) -> bool:
    """Per-OC, a chunk must lie inside one group; per-IC, a program's rows must (BLOCK_N ≤ group). `cfg` starts
    with (BLOCK_N, NCHUNK, UNITS)."""
    block_n, _, units = cfg[:3]
    if per_ic:
        return group_size >= n or block_n <= group_size
    return group_size >= k or group_size % (units * gemv_unit(bits)) == 0


def _gemv_meta(bits: int, group_size: int, per_ic: bool, k: int, n: int) -> dict:
    """The launch config of a GEMV call: pre-tuned for its shape, else its bit width's default, with chunks
    (per-OC) or rows (per-IC) narrowed to fit a small group. Under TRITON_INTERPRET=1 a single small tile."""
    if _interpret_mode():
        return {"BLOCK_N": 4, "NCHUNK": 2, "UNITS": gemv_min_units(bits), "PREFETCH": True, "HALF": True,
                "num_warps": 1, "num_stages": 1}
    block_n, nchunk, units, warps, prefetch, half = GEMV_PRETUNED.get((bits, "ic" if per_ic else "oc", k, n),
                                                                      GEMV_DEFAULT[bits])
    while not _gemv_fits((block_n, nchunk, units), bits, group_size, per_ic, k, n):
        units, block_n = (units // 2, block_n) if units > gemv_min_units(bits) else (units, block_n // 2)
    return _gemv_kwargs((block_n, nchunk, units, warps, prefetch, half))


def _gemv_kwargs(cfg: tuple) -> dict:
    block_n, nchunk, units, warps, prefetch, half = cfg
    return {"BLOCK_N": block_n, "NCHUNK": nchunk, "UNITS": units, "PREFETCH": prefetch, "HALF": half,
            "num_warps": warps, "num_stages": 1}


def _mma_configs() -> list:
    """Tensor-core tiles: 16-row tiles with long K steps for decode-sized M, 64/128-row tiles for prefill."""
    if _interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 4}, num_warps=1, num_stages=1)]

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> "triton.Config":
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=warps,
                             num_stages=stages)

    return [
        # decode-sized M (≤ 16): narrow N tiles for enough programs, long K steps for bytes in flight
        cfg(16, 32, 256, 4, 4),
        cfg(16, 64, 128, 4, 4),
        cfg(16, 16, 512, 4, 3),
        # medium M (≤ 128)
        cfg(64, 64, 128, 4, 4),
        cfg(64, 128, 64, 4, 4),
        # prefill: the weight tile is dequantized once per BLOCK_M rows, so tall tiles amortize it
        cfg(128, 128, 64, 8, 3),
        cfg(128, 64, 64, 4, 4),
        cfg(256, 128, 64, 8, 3),
    ]


def _m_bucket(m: int) -> int:
    """Autotune key for M: 16 covers decode sizes (one tile row), then powers of two up to 4096."""
    return 16 if m <= 16 else min(1 << (m - 1).bit_length(), 4096)


def _bucket(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


def _prune_mma(configs, named_args, **kwargs):
    """Keep tiles that fit M's bucket and, per-IC, put one group of output rows in a tile (BLOCK_N ≤ group)."""
    args = {**named_args, **kwargs}
    m_bucket, group, n = args["M_BUCKET"], args["GROUP"], args["N"]
    kept = []
    for c in configs:
        bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        if args["PER_IC"] and group < n and bn > group:
            continue
        if (m_bucket <= 16) != (bm == 16) or (m_bucket <= 128) != (bm <= 64):
            continue
        kept.append(c)
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]))]


def _even_k_gemv(args) -> bool:
    return args["K"] % (args["NCHUNK"] * args["UNITS"] * gemv_unit(args["BITS"])) == 0


def _even_k_mma(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


def _autotune_bench(fn, quantiles=None):
    """Shorter autotune timing than triton's default (25 + 100 ms a config): the layers are µs-sized."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_HELPERS = ("_spread3", "_spread4", "_fields", "_select", "_rotl", "_take", "_halves", "_pack_half2", "_hfma2",
            "_hadd2", "_hadd2_ref", "_dequant_tile", "_gemv_load", "_gemv_qx_pairs")


@functools.cache
def _kernels(interpret: bool) -> dict:
    """The autotuned kernels, built once per mode (`interpret` keys the cache; see the section note)."""
    for name in _HELPERS:
        globals()[name] = triton.jit(globals()[f"{name}_impl"])
    gemv = triton.heuristics({"EVEN_K": _even_k_gemv})(triton.jit(_gemv_kernel))  # configs: `_gemv_meta`
    mma = triton.autotune(
        configs=_mma_configs(),
        # GROUP: per-IC tiles must not be wider than a group, so the best tile differs by group size.
        key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "GROUP", "BITS", "PER_IC", "GROUP_K", "HAS_BIAS", "DOT_FP32"],
        prune_configs_by={"early_config_prune": _prune_mma},
        do_bench=_autotune_bench,
    )(triton.heuristics({"EVEN_K": _even_k_mma})(triton.jit(_mma_kernel)))
    dequant = triton.heuristics({"EVEN_K": _even_k_mma})(triton.jit(_dequant_kernel))
    return {"gemv": gemv, "mma": mma, "dequant": dequant}


# (kernel name, autotune key, dtypes, mode) -> the launch kwargs the Autotuner chose for it.
_TUNED_META: dict[tuple, dict] = {}


def gemv_supported(x: torch.Tensor, bits: int, group_size: int, group_dim: str) -> bool:
    """The GEMV needs each thread's K chunk (at least `gemv_min_chunk(bits)` codes) inside one per-OC group."""
    return group_dim == "ic" or group_size % gemv_min_chunk(bits) == 0 or group_size >= x.shape[1]


def uses_gemv(x: torch.Tensor, bits: int, group_size: int, group_dim: str) -> bool:
    """Whether `lowbit_matmul_triton` runs this call through the GEMV: few rows, and a layout it supports."""
    return x.shape[0] <= GEMV_MAX_M[group_dim] and gemv_supported(x, bits, group_size, group_dim)


@dataclasses.dataclass
class _Launch:
    """One kernel call, planned: which kernel, its arguments and flags, its autotune key (the GEMV: its
    pre-tuned config) and grid."""

    kernel: str
    args: tuple
    flags: dict
    tune_key: tuple
    grid: Callable[[dict], tuple]
    device: torch.device
    y: torch.Tensor
    meta: dict | None = None


def _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel: str) -> _Launch:
    name = f"lowbit_{kernel}_triton"
    check_inputs(x, packed, scale, zero, bits, group_size, group_dim, bias)
    if triton is None:
        raise RuntimeError(f"{name} needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}")
    if not x.is_cuda and not _interpret_mode():
        raise ValueError(f"{name} runs on CUDA tensors (or any under TRITON_INTERPRET=1), got {x.device}")
    if kernel == "gemv" and not gemv_supported(x, bits, group_size, group_dim):
        raise ValueError(f"the GEMV needs group_size to be a multiple of {gemv_min_chunk(bits)} or ≥ in_features "
                         f"for group_dim='oc', got {group_size}; use lowbit_mma_triton")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    if bias is not None:
        bias = bias.contiguous()
    (m, k), n = x.shape, packed.shape[0]
    if kernel == "gemv" and m > 65535:
        raise ValueError(f"the GEMV launches one program column per row of x (at most 65535), got M={m}")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    per_ic = group_dim == "ic"
    head = (x, packed, scale, zero, bias if bias is not None else scale, y)
    strides = (x.stride(0), x.stride(1), packed.stride(0), scale.stride(0), scale.stride(1), y.stride(0))
    dtypes = (x.dtype, bias.dtype if bias is not None else None)
    if kernel == "gemv":
        flags = {"BITS": bits, "PER_IC": per_ic, "HAS_BIAS": bias is not None, "USE_ASM": not _interpret_mode()}
        # group index = index >> shift; a group spanning the whole dimension (any size) has index 0
        shift = group_size.bit_length() - 1 if group_size & (group_size - 1) == 0 else 31
        args = (*head, n, k, -(-k // 32), shift, *strides)
        return _Launch("gemv", args, flags, (), lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m), x.device, y,
                       _gemv_meta(bits, group_size, per_ic, k, n))
    flags = {
        "BITS": bits,
        "PER_IC": per_ic,
        "GROUP_K": 0 if (per_ic or group_size >= k) else group_size,
        "HAS_BIAS": bias is not None,
        "USE_ASM": not _interpret_mode(),
        "DOT_FP32": x.dtype == torch.float32 or _interpret_mode(),
    }
    buckets = (_m_bucket(m), _bucket(n), _bucket(k))
    args = (*head, m, n, k, -(-k // 32), group_size, ONE_BITS, *strides, *buckets)
    return _Launch("mma", args, flags, (*buckets, group_size, *flags.values(), *dtypes),
                   lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),), x.device, y)


def _run(call: _Launch, config: dict | None) -> torch.Tensor:
    """Run the kernel: the GEMV with its pre-tuned config; the tensor-core kernel autotuned on its first call
    per key, then launched with the chosen config directly.

    `config` (tile kwargs plus num_warps / num_stages) overrides either: tests and tile sweeps.
    """
    if call.y.numel() == 0:
        return call.y
    interpret = _interpret_mode()
    autotuned = _kernels(interpret)[call.kernel]
    key = (call.kernel, *call.tune_key, interpret)
    meta = config if config is not None else (call.meta or _TUNED_META.get(key))
    device_ctx = contextlib.nullcontext()
    if call.device.type == "cuda" and call.device.index != torch.cuda.current_device():
        device_ctx = torch.cuda.device(call.device)  # triton launches on the current device
    with device_ctx:
        if call.kernel == "gemv":
            autotuned[call.grid(meta)](*call.args, **call.flags, **meta)
        elif meta is None:
            # The first call for a key goes through triton's Autotuner (benchmarks the candidates); later
            # ones launch the chosen config, skipping the Autotuner's per-call host work.
            autotuned[call.grid](*call.args, **call.flags)
            _TUNED_META[key] = autotuned.best_config.all_kwargs()
        else:
            autotuned.fn[call.grid(meta)](*call.args, **call.flags, **meta)
    return call.y


def candidate_configs(x, packed, scale, zero, bits, group_size, group_dim, bias=None, kernel: str = "mma") -> list[dict]:
    """The tile configs (launch kwargs) for this call: the autotuner's candidates after pruning; for the GEMV
    its pre-tuned config first, then the other `GEMV_CANDIDATES` that fit (tuning and checks)."""
    call = _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel)
    if kernel == "gemv":
        if _interpret_mode():
            return [call.meta]
        k, n = x.shape[1], packed.shape[0]
        fits = [_gemv_kwargs(c) for c in GEMV_CANDIDATES
                if _gemv_fits(c, bits, group_size, group_dim == "ic", k, n)]
        return [call.meta] + [c for c in fits if c != call.meta]
    autotuned = _kernels(_interpret_mode())[kernel]
    named = dict(zip(autotuned.arg_names, call.args))
    return [c.all_kwargs() for c in _prune_mma(autotuned.configs, named, **call.flags)]


def compile_candidates(x, packed, scale, zero, bits, group_size, group_dim, bias=None, kernel: str = "mma",
                       configs: list[dict] | None = None) -> int:
    """Compile (not run) the candidate tiles of this call, or `configs`, into triton's cache; returns how many.

    Autotuning compiles candidates one after another; calling this from several processes first (the
    benchmark does) fills the shared on-disk cache in parallel.
    """
    call = _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel)
    heur = _kernels(_interpret_mode())[kernel]
    if kernel != "gemv":
        heur = heur.fn  # the Autotuner's wrapped triton.heuristics
    if configs is None:
        configs = candidate_configs(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel)
    named = dict(zip(heur.arg_names, call.args))
    for cfg in configs:
        extra = {name: fn({**named, **call.flags, **cfg}) for name, fn in heur.values.items()}
        heur.fn.warmup(*call.args, grid=call.grid(cfg), **call.flags, **cfg, **extra)
    return len(configs)


def lowbit_gemv_triton(x, packed, scale, zero, bits, group_size, group_dim, bias=None, config=None) -> torch.Tensor:
    """`lowbit_matmul_reference` through the CUDA-core GEMV (one program per BLOCK_N rows and row of x)."""
    return _run(_plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "gemv"), config)


def lowbit_mma_triton(x, packed, scale, zero, bits, group_size, group_dim, bias=None, config=None) -> torch.Tensor:
    """`lowbit_matmul_reference` through the tiled tensor-core kernel (any M)."""
    return _run(_plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "mma"), config)


def lowbit_dequant_triton(packed, scale, zero, bits, group_size, group_dim, in_features, dtype) -> torch.Tensor:
    """The dense weight `(N, K)` = (q − z)·s in `dtype`, one memory-bound pass (the prefill path's first half)."""
    check_packed(packed, bits, in_features)
    check_group_params(scale, zero, group_size, group_dim, packed.shape[0], in_features)
    if triton is None:
        raise RuntimeError(f"lowbit_dequant_triton needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}")
    if packed.stride(1) != 1:
        packed = packed.contiguous()
    if scale.stride() != zero.stride():
        scale, zero = scale.contiguous(), zero.contiguous()
    n, k = packed.shape[0], in_features
    out = torch.empty((n, k), dtype=dtype, device=packed.device)
    per_ic = group_dim == "ic"
    block_n, block_k = (16, 64) if _interpret_mode() else (32, 256)
    if per_ic and group_size < n:
        block_n = min(block_n, group_size)
    grid = (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    _kernels(_interpret_mode())["dequant"][grid](
        packed, scale, zero, out, n, k, -(-k // 32), group_size, ONE_BITS,
        packed.stride(0), scale.stride(0), scale.stride(1), out.stride(0),
        BITS=bits, PER_IC=per_ic, GROUP_K=0 if (per_ic or group_size >= k) else group_size,
        USE_ASM=not _interpret_mode(), BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
    )
    return out


PREFILL_MIN_M = 128  # from this many rows the dense path (dequantize, then cuBLAS) competes: timed once a key
_PREFILL_CHOICE: dict[tuple, str] = {}


def _dense(x, packed, scale, zero, bits, group_size, group_dim, bias) -> torch.Tensor:
    w = lowbit_dequant_triton(packed, scale, zero, bits, group_size, group_dim, x.shape[1], x.dtype)
    return torch.nn.functional.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def _prefill_path(x, packed, scale, zero, bits, group_size, group_dim, bias) -> str:
    """"fused" or "dense" for this call's autotune key: whichever ran faster the first time (a warm-up step,
    like autotuning: it synchronizes, so it must not happen during CUDA-graph capture)."""
    call = _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "mma")
    key = (*call.tune_key, x.device.index)
    if key not in _PREFILL_CHOICE:
        fused = lambda: _run(_plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "mma"), None)  # noqa: E731
        dense = lambda: _dense(x, packed, scale, zero, bits, group_size, group_dim, bias)  # noqa: E731
        fused()  # autotunes the fused kernel first
        times = {name: triton.testing.do_bench(fn, warmup=5, rep=25) for name, fn in (("fused", fused), ("dense", dense))}
        _PREFILL_CHOICE[key] = min(times, key=times.get)
    return _PREFILL_CHOICE[key]


def lowbit_matmul_triton(x, packed, scale, zero, bits, group_size, group_dim, bias=None) -> torch.Tensor:
    """Kernel choice by M: the GEMV for up to `GEMV_MAX_M` rows (where its group layout allows), the
    tensor-core kernel for decode-sized M, and for prefill-sized M (bf16/fp16 on a GPU) the faster of that
    kernel and the dense path, measured once per shape."""
    m = x.shape[0]
    if uses_gemv(x, bits, group_size, group_dim):
        return _run(_plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "gemv"), None)
    if m >= PREFILL_MIN_M and x.is_cuda and x.dtype != torch.float32:
        if _prefill_path(x, packed, scale, zero, bits, group_size, group_dim, bias) == "dense":
            return _dense(x, packed, scale, zero, bits, group_size, group_dim, bias)
    return _run(_plan(x, packed, scale, zero, bits, group_size, group_dim, bias, "mma"), None)


# ----------------------------------------------------------------------------------------------------
# The CUDA entry point as a torch custom op: opaque to torch.compile (with a fake for shape propagation),
# free of host syncs, so it can be captured in CUDA graphs once autotuning has run (warm up first).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op(
    "hf_outliertune::lowbit_matmul",
    mutates_args=(),
    schema="(Tensor x, Tensor packed, Tensor scale, Tensor zero, int bits, int group_size, str group_dim, "
    "Tensor? bias) -> Tensor",
)
def _lowbit_matmul_op(x, packed, scale, zero, bits, group_size, group_dim, bias):
    return lowbit_matmul_triton(x, packed, scale, zero, bits, group_size, group_dim, bias)


@_lowbit_matmul_op.register_fake
def _(x, packed, scale, zero, bits, group_size, group_dim, bias):
    return x.new_empty((x.shape[0], packed.shape[0]))


def _setup_context(ctx, inputs, output) -> None:
    x, packed, scale, zero, bits, group_size, group_dim, bias = inputs
    ctx.save_for_backward(packed, scale, zero)
    ctx.layout = (bits, group_size, group_dim, x.shape[1], x.dtype, bias is not None)


def _backward(ctx, grad_y):
    """dL/dx = dL/dy · W (the frozen weight gets no gradient); dL/dbias = Σ_m dL/dy."""
    packed, scale, zero = ctx.saved_tensors
    bits, group_size, group_dim, k, x_dtype, has_bias = ctx.layout
    w = dequantize_packed(packed, scale, zero, bits, group_size, group_dim, k)
    grad_x = (grad_y.float() @ w).to(x_dtype) if ctx.needs_input_grad[0] else None
    grad_b = grad_y.sum(dim=0) if has_bias and ctx.needs_input_grad[7] else None
    return grad_x, None, None, None, None, None, None, grad_b


_lowbit_matmul_op.register_autograd(_backward, setup_context=_setup_context)
