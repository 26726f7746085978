"""Weight-only low-bit matmul with the dequantization fused into the kernel.

    y = x · Wᵀ + bias,   W[n, k] = (q[n, k] − zero) · scale   (fp32),

with `q` the 2/3/4/8-bit codes packed as `kernels/packing.py` describes and `scale`/`zero` fp16 per group,
grouped along K (`group_dim="oc"`, indexed `[n, k // g]`) or along N (`"ic"`, indexed `[n // g, k]`).

`lowbit_matmul_reference` is the specification (pure PyTorch, any device, differentiable w.r.t. x).
Triton kernels implement it on the GPU; `lowbit_matmul` dispatches by device and M:

- `_gemv_kernel` (M = 1, decode): CUDA-core GEMV. Each thread owns a chunk of K (32 codes; 64 at 3 bits) for
  several rows and loads it with 16-byte word vectors; each field is moved by one shift and merged by one LOP3
  into the mantissa of a float in [1, 2) (`v = 1 + q / 2^b`, no int→float conversion), so that
  Σ q·x = 2^b·(Σ v·x − Σ x) costs one multiply-add a code. The group's scale and zero are applied once per
  chunk: Σ (q − z)·s·x = s·(Σ q·x − z·Σ x). Per-IC scales vary along K, so they scale x instead (x' = s·x,
  with Σ z·x' the same for every row), which needs all rows of a program in one group (BLOCK_N ≤ 16 ≤ g).
- `_mma_kernel` (M ≥ 2): tiled tensor-core GEMM, x tile · dequantized weight tileᵀ, with the per-element
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
    """Dispatch: on CUDA (triton importable) the `hf_outliertune::lowbit_matmul` custom op, else the reference."""
    if x.is_cuda and triton is not None:
        return torch.ops.hf_outliertune.lowbit_matmul(x, packed, scale, zero, bits, group_size, group_dim, bias)
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


def _gemv_load_impl(
    x_row, stride_xk, w_rows, k0, K, KW,
    BITS: tl.constexpr, NCHUNK: tl.constexpr, CHUNK: tl.constexpr, MASKED: tl.constexpr,
):
    """One GEMV step's raw operands: x (NCHUNK, CHUNK) and the packed words of each chunk (wa, wb).

    bits 2/4/8: wa = wb = the chunk's CHUNK/(32/bits) words; 3 bits: wa = 2 bit-0 words, wb = 4 (q >> 1) words.
    Chunks starting at or past K load nothing (masked), so a prefetch beyond the last step is free.
    """
    u = tl.arange(0, NCHUNK)
    kc = k0 + u * CHUNK
    xk = kc[:, None] + tl.arange(0, CHUNK)[None, :]
    if MASKED:
        x = tl.load(x_row + xk * stride_xk, mask=xk < K, other=0.0)
    else:
        x = tl.load(x_row + xk * stride_xk)
    if BITS == 3:
        w0_offs = k0 // 32 + (u * 2)[:, None] + tl.arange(0, 2)[None, :]
        w1_offs = KW + k0 // 16 + (u * 4)[:, None] + tl.arange(0, 4)[None, :]
        if MASKED:
            wa = tl.load(w_rows + w0_offs[None, :, :], mask=(kc[:, None] + tl.arange(0, 2)[None, :] * 32 < K)[None],
                         other=0)
            wb = tl.load(w_rows + w1_offs[None, :, :], mask=(kc[:, None] + tl.arange(0, 4)[None, :] * 16 < K)[None],
                         other=0)
        else:
            wa = tl.load(w_rows + w0_offs[None, :, :])
            wb = tl.load(w_rows + w1_offs[None, :, :])
    else:
        V: tl.constexpr = 32 // BITS
        CW: tl.constexpr = CHUNK // V
        w_offs = k0 // V + (u * CW)[:, None] + tl.arange(0, CW)[None, :]
        if MASKED:
            wa = tl.load(w_rows + w_offs[None, :, :], mask=(kc < K)[None, :, None], other=0)
        else:
            wa = tl.load(w_rows + w_offs[None, :, :])
        wb = wa
    return x, wa, wb


def _gemv_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, y_ptr,
    N, K, KW, GROUP, one_bits,
    stride_xm, stride_xk, stride_wn, stride_s0, stride_s1, stride_ym,
    N_BUCKET, K_BUCKET,  # autotune keys only
    BITS: tl.constexpr,
    PER_IC: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,
    USE_ASM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NCHUNK: tl.constexpr,
    SPLIT_PLANES: tl.constexpr,  # 3 bits: sum the two bit planes separately (see below)
    PREFETCH: tl.constexpr,  # load step i+1 before computing step i
):
    """y[m, rows] for one row m of x and BLOCK_N weight rows; NCHUNK chunks of K (one per thread) a step."""
    CHUNK: tl.constexpr = 16 if BITS == 8 else (64 if BITS == 3 else 32)
    V: tl.constexpr = 32 // BITS  # codes a word (bits 2/4/8; the 3-bit planes are unpacked explicitly)
    CW: tl.constexpr = CHUNK // V  # words a chunk (bits 2/4/8)
    SCALE: tl.constexpr = 1 << BITS
    pid = tl.program_id(0)
    m = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_w = (rows % N).to(tl.int64)  # rows past N wrap around; their results are masked at the store
    u = tl.arange(0, NCHUNK)
    c = tl.arange(0, CHUNK)
    one = one_bits.to(tl.uint32)
    x_row = x_ptr + m * stride_xm
    w_rows = w_ptr + rows_w[:, None, None] * stride_wn
    if PER_IC:
        grp_ic = (pid * BLOCK_N) // GROUP  # every row of the block lies in this group (BLOCK_N ≤ 16 ≤ GROUP)
    acc = tl.zeros((BLOCK_N, NCHUNK), dtype=tl.float32)
    STEP: tl.constexpr = NCHUNK * CHUNK
    if PREFETCH:  # software pipelining by hand: the next step's loads are in flight during this step's math
        nxt = _gemv_load(x_row, stride_xk, w_rows, 0, K, KW, BITS, NCHUNK, CHUNK, True)
    for k0 in range(0, K, STEP):
        if PREFETCH:
            x, wa, wb = nxt
            nxt = _gemv_load(x_row, stride_xk, w_rows, k0 + STEP, K, KW, BITS, NCHUNK, CHUNK, True)
        else:
            x, wa, wb = _gemv_load(x_row, stride_xk, w_rows, k0, K, KW, BITS, NCHUNK, CHUNK, not EVEN_K)
        x = x.to(tl.float32)
        kc = k0 + u * CHUNK  # first k of each chunk
        xk = kc[:, None] + c[None, :]
        if PER_IC:
            # Per-IC scales vary along K: fold them into x (xq = s·x); Σ z·s·x is the same for every row.
            sk = s_ptr + grp_ic * stride_s0 + xk * stride_s1
            zk = z_ptr + grp_ic * stride_s0 + xk * stride_s1
            if EVEN_K:
                s = tl.load(sk).to(tl.float32)
                z = tl.load(zk).to(tl.float32)
            else:
                s = tl.load(sk, mask=xk < K, other=0.0).to(tl.float32)
                z = tl.load(zk, mask=xk < K, other=0.0).to(tl.float32)
            xq = x * s
            zx = tl.sum(z * xq, axis=1)
        else:
            xq = x
        xsum = tl.sum(xq, axis=1)
        # Unpack each code into v = 1 + q / 2^b (a float in [1, 2)) and form qx = Σ_chunk q·xq per row.
        if BITS == 3:
            # A 64-code chunk is 2 words of the bit-0 plane (wa) and 4 words of the (q >> 1) plane (wb).
            w0 = wa.to(tl.uint32, bitcast=True)
            w1 = wb.to(tl.uint32, bitcast=True)
            ones = tl.full((BLOCK_N, NCHUNK, CHUNK), 0, tl.uint32) + one
            if SPLIT_PLANES:
                # Each plane summed on its own: Σ b0·x = 2(p0 − Σx), Σ b12·x = 4(p1 − Σx). One more
                # multiply-add a code than merging the planes, but fewer live registers.
                f0 = _fields(_spread4(w0, BLOCK_N, NCHUNK, 2, 32), 1, 32, 22)
                v0 = _select(tl.reshape(f0, (BLOCK_N, NCHUNK, CHUNK)), 1 << 22, ones, USE_ASM)
                p0 = tl.sum(v0.to(tl.float32, bitcast=True) * xq[None, :, :], axis=2)
                f1 = _fields(_spread4(w1, BLOCK_N, NCHUNK, 4, 16), 2, 16, 21)
                v1 = _select(tl.reshape(f1, (BLOCK_N, NCHUNK, CHUNK)), 3 << 21, ones, USE_ASM)
                p1 = tl.sum(v1.to(tl.float32, bitcast=True) * xq[None, :, :], axis=2)
                qx = 2 * p0 + 8 * p1 - 10 * xsum[None, :]
            else:
                # Both planes merged into one mantissa: v = 1 + (b0 + 2·b12) / 8 = 1 + q / 8.
                f0 = _fields(_spread4(w0, BLOCK_N, NCHUNK, 2, 32), 1, 32, 20)
                f1 = _fields(_spread4(w1, BLOCK_N, NCHUNK, 4, 16), 2, 16, 21)
                hi = _select(tl.reshape(f1, (BLOCK_N, NCHUNK, CHUNK)), 3 << 21, ones, USE_ASM)
                vb = _select(tl.reshape(f0, (BLOCK_N, NCHUNK, CHUNK)), 1 << 20, hi, USE_ASM)
                p = tl.sum(vb.to(tl.float32, bitcast=True) * xq[None, :, :], axis=2)
                qx = SCALE * (p - xsum[None, :])
        else:
            f = _fields(_spread4(wa.to(tl.uint32, bitcast=True), BLOCK_N, NCHUNK, CW, V), BITS, V, 23 - BITS)
            f = tl.reshape(f, (BLOCK_N, NCHUNK, CHUNK))
            vb = _select(f, ((1 << BITS) - 1) << (23 - BITS), tl.full(f.shape, 0, tl.uint32) + one, USE_ASM)
            p = tl.sum(vb.to(tl.float32, bitcast=True) * xq[None, :, :], axis=2)
            qx = SCALE * (p - xsum[None, :])
        if PER_IC:
            acc += qx - zx[None, :]
        else:
            # Per-OC: one scale and zero per (row, chunk): Σ (q − z)·s·x = s·(qx − z·Σx).
            sp = rows_w[:, None] * stride_s0 + (kc // GROUP)[None, :] * stride_s1
            if EVEN_K:
                s = tl.load(s_ptr + sp).to(tl.float32)
                z = tl.load(z_ptr + sp).to(tl.float32)
            else:
                s = tl.load(s_ptr + sp, mask=(kc < K)[None, :], other=0.0).to(tl.float32)
                z = tl.load(z_ptr + sp, mask=(kc < K)[None, :], other=0.0).to(tl.float32)
            acc += s * (qx - z * xsum[None, :])
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows_w).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=rows < N)


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

GEMV_MAX_M = 1  # the CUDA-core GEMV serves M = 1; from 2 rows on the tensor-core kernel costs no more


# GEMV tiles (BLOCK_N, NCHUNK, num_warps, SPLIT_PLANES, PREFETCH). Threads take chunks first (32 a warp),
# then the remaining warps split the rows, so a thread holds BLOCK_N / (warps on rows) rows of its chunk.
# NCHUNK·chunk = 2048 codes a step divides both 4096 and 14336 (Llama's K) and keeps all threads busy.
# Lists from an H100 sweep (bench/lowbit_gemm.py --sweep): one or two rows a thread won.
GEMV_TILES = [(4, 64, 4, False, False), (4, 64, 4, False, True), (4, 64, 2, False, True), (8, 64, 4, False, True)]
GEMV_TILES_3BIT = [(8, 32, 4, False, False), (4, 32, 4, False, True), (8, 32, 8, False, True),
                   (8, 32, 4, True, True)]


def _gemv_configs() -> list:
    """GEMV tiles (both lists; pruned by bit width). Under TRITON_INTERPRET=1 a single small tile."""
    if _interpret_mode():
        return [triton.Config({"BLOCK_N": 4, "NCHUNK": 4, "SPLIT_PLANES": False, "PREFETCH": True}, num_warps=1,
                              num_stages=1)]
    return [
        triton.Config({"BLOCK_N": bn, "NCHUNK": nc, "SPLIT_PLANES": split, "PREFETCH": pre}, num_warps=w,
                      num_stages=1)
        for bn, nc, w, split, pre in GEMV_TILES + GEMV_TILES_3BIT
    ]


def _prune_gemv(configs, named_args, **kwargs):
    """3-bit chunks hold 64 codes (two planes): their own tile list, with fewer rows a thread."""
    tiles = GEMV_TILES_3BIT if {**named_args, **kwargs}["BITS"] == 3 else GEMV_TILES
    kept = [c for c in configs if (c.kwargs["BLOCK_N"], c.kwargs["NCHUNK"], c.num_warps, c.kwargs["SPLIT_PLANES"],
                                   c.kwargs["PREFETCH"]) in tiles]
    return kept or configs[:1]


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


def gemv_chunk(bits: int) -> int:
    """Codes of K one GEMV thread handles per step: one or two 16-byte loads (2 + 4 words at 3 bits)."""
    return {2: 32, 3: 64, 4: 32, 8: 16}[bits]


def _even_k_gemv(args) -> bool:
    return args["K"] % (args["NCHUNK"] * gemv_chunk(args["BITS"])) == 0


def _even_k_mma(args) -> bool:
    return args["K"] % args["BLOCK_K"] == 0


def _autotune_bench(fn, quantiles=None):
    """Shorter autotune timing than triton's default (25 + 100 ms a config): the layers are µs-sized."""
    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


_HELPERS = ("_spread3", "_spread4", "_fields", "_select", "_dequant_tile", "_gemv_load")


@functools.cache
def _kernels(interpret: bool) -> dict:
    """The autotuned kernels, built once per mode (`interpret` keys the cache; see the section note)."""
    for name in _HELPERS:
        globals()[name] = triton.jit(globals()[f"{name}_impl"])
    gemv = triton.autotune(
        configs=_gemv_configs(),
        key=["N_BUCKET", "K_BUCKET", "BITS", "PER_IC", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_gemv},
        do_bench=_autotune_bench,
    )(triton.heuristics({"EVEN_K": _even_k_gemv})(triton.jit(_gemv_kernel)))
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
    """The GEMV needs each thread's K chunk (`gemv_chunk(bits)` codes) inside one per-OC group."""
    return group_dim == "ic" or group_size % gemv_chunk(bits) == 0 or group_size >= x.shape[1]


@dataclasses.dataclass
class _Launch:
    """One kernel call, planned: which kernel, its arguments and flags, its autotune key and grid."""

    kernel: str
    args: tuple
    flags: dict
    tune_key: tuple
    grid: Callable[[dict], tuple]
    device: torch.device
    y: torch.Tensor


def _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel: str) -> _Launch:
    name = f"lowbit_{kernel}_triton"
    check_inputs(x, packed, scale, zero, bits, group_size, group_dim, bias)
    if triton is None:
        raise RuntimeError(f"{name} needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}")
    if not x.is_cuda and not _interpret_mode():
        raise ValueError(f"{name} runs on CUDA tensors (or any under TRITON_INTERPRET=1), got {x.device}")
    if kernel == "gemv" and not gemv_supported(x, bits, group_size, group_dim):
        raise ValueError(f"the GEMV needs group_size to be a multiple of {gemv_chunk(bits)} or ≥ in_features "
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
        buckets = (_bucket(n), _bucket(k))
        args = (*head, n, k, -(-k // 32), group_size, ONE_BITS, *strides, *buckets)
        return _Launch("gemv", args, flags, (*buckets, *flags.values(), *dtypes),
                       lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), m), x.device, y)
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
    """Run the autotuned kernel; after its first call per key, launch the chosen config directly.

    `config` (tile kwargs plus num_warps / num_stages) bypasses autotuning: tests and tile sweeps.
    """
    if call.y.numel() == 0:
        return call.y
    interpret = _interpret_mode()
    autotuned = _kernels(interpret)[call.kernel]
    key = (call.kernel, *call.tune_key, interpret)
    meta = config if config is not None else _TUNED_META.get(key)
    device_ctx = contextlib.nullcontext()
    if call.device.type == "cuda" and call.device.index != torch.cuda.current_device():
        device_ctx = torch.cuda.device(call.device)  # triton launches on the current device
    with device_ctx:
        if meta is None:
            # The first call for a key goes through triton's Autotuner (benchmarks the candidates); later
            # ones launch the chosen config, skipping the Autotuner's per-call host work.
            autotuned[call.grid](*call.args, **call.flags)
            _TUNED_META[key] = autotuned.best_config.all_kwargs()
        else:
            autotuned.fn[call.grid(meta)](*call.args, **call.flags, **meta)
    return call.y


def candidate_configs(x, packed, scale, zero, bits, group_size, group_dim, bias=None, kernel: str = "mma") -> list[dict]:
    """The tile configs (launch kwargs) the autotuner would try for this call, after pruning."""
    call = _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel)
    autotuned = _kernels(_interpret_mode())[kernel]
    named = dict(zip(autotuned.arg_names, call.args))
    prune = _prune_gemv if kernel == "gemv" else _prune_mma
    return [c.all_kwargs() for c in prune(autotuned.configs, named, **call.flags)]


def compile_candidates(x, packed, scale, zero, bits, group_size, group_dim, bias=None, kernel: str = "mma",
                       configs: list[dict] | None = None) -> int:
    """Compile (not run) the candidate tiles of this call, or `configs`, into triton's cache; returns how many.

    Autotuning compiles candidates one after another; calling this from several processes first (the
    benchmark does) fills the shared on-disk cache in parallel.
    """
    call = _plan(x, packed, scale, zero, bits, group_size, group_dim, bias, kernel)
    heur = _kernels(_interpret_mode())[kernel].fn
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
    """Kernel choice by M: the GEMV for a single row (where its group layout allows), the tensor-core kernel
    for decode-sized M, and for prefill-sized M (bf16/fp16 on a GPU) the faster of that kernel and the dense
    path, measured once per shape."""
    m = x.shape[0]
    if m <= GEMV_MAX_M and gemv_supported(x, bits, group_size, group_dim):
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
