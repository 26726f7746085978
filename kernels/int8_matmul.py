"""int8 × int8 → int32 GEMM with a fused floating-point epilogue.

    y[m, n] = (Σ_k a[m, k] · w[n, k]) · a_scale[m] · w_scale[n] + bias[n]

`a` holds activation codes `(M, K)`, `w` weight codes `(N, K)` (K-major, the nn.Linear layout),
`a_scale` is a per-token step `(M,)` or `None` (static activations whose step is folded into the
weights), `w_scale` a per-output-channel step `(N,)`. The accumulation is exact in int32; the epilogue
runs in fp32 and the result is cast to `out_dtype`.

`int8_matmul_reference` is the specification (pure PyTorch, any device); `int8_matmul_triton` is the
fused Triton kernel; `int8_matmul` dispatches: Triton for CUDA tensors when triton imports, else the
reference.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch

from .dispatch import through_custom_op, uses_triton

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


def _int32_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int32 accumulation of `a @ w.T` for int8 inputs, on any device and shape."""
    m, k = a.shape
    if a.device.type == "cpu" or (m > 16 and k % 8 == 0 and w.shape[0] % 8 == 0):
        return torch._int_mm(a.contiguous(), w.t())
    # |Σ a·w| ≤ 127² · K < 2^53, so a float64 product is exact as well.
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_matmul_reference(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification of the kernel, and the CPU path."""
    acc = _int32_matmul(a, w)
    y = acc.float() * w_scale.float()[None, :]
    if a_scale is not None:
        y = y * a_scale.float()[:, None]
    if bias is not None:
        y = y + bias.float()[None, :]
    return y.to(out_dtype)


def int8_matmul(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Dispatch: on CUDA (triton importable) the Triton kernels — through the `hf_outliertune::int8_matmul`
    custom op while torch.compile traces, directly in eager mode (the op's dispatch costs host time that
    bounds eager prefill) — else the reference."""
    if uses_triton(a):
        if through_custom_op(a):
            return torch.ops.hf_outliertune.int8_matmul(a, w, w_scale, a_scale, bias, out_dtype)
        return int8_matmul_cuda(a, w, w_scale, a_scale, bias, out_dtype)
    return int8_matmul_reference(a, w, w_scale, a_scale, bias, out_dtype)


# ----------------------------------------------------------------------------------------------------
# Triton kernel
# ----------------------------------------------------------------------------------------------------


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _int8_matmul_configs() -> list:
    """Autotune candidates: Hopper-sized tiles, or a single small tile under TRITON_INTERPRET=1.

    The interpreter runs every tile in numpy and cannot benchmark several configs, so there it gets one
    16×16×32 tile (the smallest int8 `tl.dot` shape), which also exercises the K/M/N masking on tiny
    test shapes. On the GPU, int8 tiles want a long K (128 bytes a row per stage); the 16- and 32-row
    tiles serve decode (M of a few tokens), the 128×256 ones large prefill.
    """
    if _interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=1, num_stages=1)]

    def cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> "triton.Config":
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8},
                             num_warps=warps, num_stages=stages)

    return [
        # large M (prefill)
        cfg(128, 256, 128, 8, 3),
        cfg(128, 256, 64, 8, 4),
        cfg(256, 128, 64, 8, 4),
        cfg(128, 128, 128, 8, 4),
        cfg(128, 128, 64, 4, 4),
        # medium M
        cfg(64, 128, 128, 4, 4),
        cfg(64, 256, 128, 8, 3),
        cfg(64, 64, 128, 4, 5),
        cfg(64, 64, 256, 4, 3),
        # small M (decode): few rows, long K, narrow N for enough programs to stream w at full bandwidth
        cfg(32, 64, 256, 4, 4),
        cfg(16, 64, 256, 4, 4),
        cfg(16, 64, 512, 4, 3),
        cfg(16, 32, 512, 4, 3),
        cfg(16, 32, 256, 4, 4),
        cfg(16, 16, 512, 4, 4),
        cfg(16, 16, 1024, 4, 3),
        cfg(16, 32, 1024, 4, 3),
    ]


def _bucket(x: int) -> int:
    """Autotune key bucket: the next power of two (M varies per call; N, K per layer)."""
    return 1 << max(int(x) - 1, 0).bit_length()


def _prune_configs(configs, named_args, **kwargs):
    """Skip tiles far taller than M (decode would tune 128-row tiles that are >90% masked)."""
    args = {**named_args, **kwargs}
    m_bucket = max(args["M_BUCKET"], 16)
    kept = [c for c in configs if c.kwargs["BLOCK_M"] <= m_bucket]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"])]


# Plain function here; `_jitted_kernel()` applies `triton.autotune(triton.jit(...))` on first use. That
# is deliberate: `@triton.jit` decides interpreter vs. compiled mode when it is applied, so applying it
# lazily lets TRITON_INTERPRET=1 set after this module was imported (tests) still take effect.
def _int8_matmul_kernel(
    a_ptr, w_ptr, c_ptr, w_scale_ptr, a_scale_ptr, bias_ptr, partial_ptr, arrived_ptr,
    M, N, K,
    stride_am, stride_ak,
    stride_wn, stride_wk,
    stride_cm, stride_cn,
    stride_ws, stride_as, stride_bias,
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotune keys only
    HAS_A_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLIT_K: tl.constexpr = 1,
):
    """c[m, n] = (Σ_k a[m, k]·w[n, k]) · w_scale[n] (· a_scale[m]) (+ bias[n]), int32 accumulation.

    SPLIT_K > 1 (grid axis 1): each program sums one K range and adds its int32 tile into `partial_ptr` (a zeroed
    int32 tile per output tile) with atomics; the last of a tile's programs to arrive (`arrived_ptr` counts them)
    takes the exact sum, zeroes the partial tile and the count again for the next call, and runs the epilogue."""
    # Grouped ("super-grouping") program order, as in the Triton matmul tutorial, for L2 reuse of w tiles.
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
    # Rows/columns past M/N wrap around (their results are masked at the store), so the K loop only
    # needs a K mask. int64 row offsets: M·stride_am may pass 2^31 for long prompts.
    offs_am = (offs_m % M).to(tl.int64)
    offs_wn = (offs_n % N).to(tl.int64)
    a_ptrs = a_ptr + (offs_am[:, None] * stride_am + offs_k[None, :] * stride_ak)
    w_ptrs = w_ptr + (offs_wn[:, None] * stride_wn + offs_k[None, :] * stride_wk)

    k_steps = tl.cdiv(K, BLOCK_K)
    k_first = 0
    k_end = k_steps
    if SPLIT_K > 1:
        per_split = tl.cdiv(k_steps, SPLIT_K)
        k_first = tl.program_id(axis=1) * per_split
        k_end = tl.minimum(k_first + per_split, k_steps)
        a_ptrs += k_first * BLOCK_K * stride_ak
        w_ptrs += k_first * BLOCK_K * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k in range(k_first, k_end):
        k_mask = offs_k[None, :] < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=k_mask, other=0)
        w = tl.load(w_ptrs, mask=k_mask, other=0)
        acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K * stride_ak
        w_ptrs += BLOCK_K * stride_wk

    mask_m = offs_m < M
    mask_n = offs_n < N
    if SPLIT_K > 1:
        tile = pid_m * num_pid_n + pid_n
        offs_p = tile * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
        tl.atomic_add(partial_ptr + offs_p, acc, sem="relaxed")
        tl.debug_barrier()  # every thread's partial sums are in before the count says so
        arrived = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel")  # 0 .. SPLIT_K - 1
        # masks built as tensors from the count (a scalar mask trips the interpreter)
        last = (tl.zeros((BLOCK_M, BLOCK_N), tl.int32) + arrived) == SPLIT_K - 1
        acc = tl.atomic_xchg(partial_ptr + offs_p, tl.zeros_like(acc), mask=last, sem="acquire")
        tl.atomic_add(arrived_ptr + tile, -SPLIT_K * (arrived // (SPLIT_K - 1)), sem="relaxed")  # last: back to 0
        mask_m = mask_m & ((offs_m * 0 + arrived) == SPLIT_K - 1)  # only the last program stores

    # Epilogue in fp32, in the reference's order: (acc · w_scale) · a_scale + bias. The int32
    # accumulator never reaches the output.
    y = acc.to(tl.float32)
    w_scale = tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=0.0).to(tl.float32)
    y = y * w_scale[None, :]
    if HAS_A_SCALE:
        a_scale = tl.load(a_scale_ptr + offs_m * stride_as, mask=mask_m, other=0.0).to(tl.float32)
        y = y * a_scale[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
        y = y + bias[None, :]

    c_ptrs = c_ptr + (offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :] * stride_cn)
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@functools.cache
def _jitted_kernel(interpret: bool):
    """The autotuned kernel, built once per mode (`interpret` only keys the cache: see above)."""
    return triton.autotune(
        configs=_int8_matmul_configs(),
        key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_A_SCALE", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(triton.jit(_int8_matmul_kernel))


# Autotune key -> the launch kwargs (tile sizes, num_warps, num_stages, ...) the Autotuner chose for it.
_TUNED_META: dict[tuple, dict] = {}

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_inputs(a, w, w_scale, a_scale, bias, out_dtype) -> None:
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.dtype != torch.int8:
        raise TypeError(f"a must be a 2-D int8 tensor (M, K), got {_describe(a)}")
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.dtype != torch.int8:
        raise TypeError(f"w must be a 2-D int8 tensor (N, K), got {_describe(w)}")
    (m, k), n = a.shape, w.shape[0]
    if w.shape[1] != k:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)} (M, K), w is {tuple(w.shape)} (N, K)")
    for name, t, size, what in (("w_scale", w_scale, n, "N"), ("a_scale", a_scale, m, "M"), ("bias", bias, n, "N")):
        if t is None:
            if name == "w_scale":
                raise TypeError("w_scale is required")
            continue
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {_describe(t)}")
        if tuple(t.shape) != (size,):
            raise ValueError(f"{name} must have shape ({what},) = ({size},), got {tuple(t.shape)}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    devices = {t.device for t in (a, w, w_scale, a_scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _check_launchable(name: str, a: torch.Tensor) -> None:
    """A Triton entry point needs triton, and CUDA tensors unless the interpreter runs it."""
    if triton is None:
        raise RuntimeError(f"{name} needs triton, which failed to import: {_TRITON_IMPORT_ERROR!r}")
    if not a.is_cuda and not _interpret_mode():
        raise ValueError(f"{name} runs on CUDA tensors (or any under TRITON_INTERPRET=1), got {a.device}")


def _describe(t) -> str:
    if isinstance(t, torch.Tensor):
        return f"{t.dtype} tensor of shape {tuple(t.shape)}"
    return type(t).__name__


def int8_matmul_triton(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> torch.Tensor:
    """`int8_matmul_reference` as one fused Triton kernel (CUDA tensors; CPU ones under TRITON_INTERPRET=1).

    Any strides are accepted (no copies are made); scales and bias may be any float dtype. `config` (BLOCK_M,
    BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages, optionally SPLIT_K) overrides the tile (benchmarks, tests).
    """
    _check_inputs(a, w, w_scale, a_scale, bias, out_dtype)
    _check_launchable("int8_matmul_triton", a)
    (m, k), n = a.shape, w.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    # Unused optional operands get w_scale as a never-read placeholder pointer.
    a_scale_arg = a_scale if a_scale is not None else w_scale
    bias_arg = bias if bias is not None else w_scale
    args = [
        a, w, c, w_scale, a_scale_arg, bias_arg, w_scale, w_scale,  # split-K buffers: set below when used
        m, n, k,
        a.stride(0), a.stride(1),
        w.stride(0), w.stride(1),
        c.stride(0), c.stride(1),
        w_scale.stride(0), a_scale_arg.stride(0), bias_arg.stride(0),
        _bucket(m), _bucket(n), _bucket(k),
    ]
    flags = {"HAS_A_SCALE": a_scale is not None, "HAS_BIAS": bias is not None}
    interpret = _interpret_mode()
    autotuned = _jitted_kernel(interpret)
    # The first call for an autotune key goes through triton's Autotuner, which benchmarks the configs;
    # later ones launch the jitted kernel with the config it chose, skipping the Autotuner's per-call
    # bookkeeping (~15 µs of host time on an H100 host, against ~25 µs for the launch itself).
    tune_key = (*args[-3:], *flags.values(), out_dtype, w_scale.dtype, a_scale_arg.dtype, bias_arg.dtype, interpret)
    meta = _TUNED_META.get(tune_key)
    device_ctx = contextlib.nullcontext()
    if a.is_cuda and a.device.index != torch.cuda.current_device():
        device_ctx = torch.cuda.device(a.device)  # triton launches on the current device
    with device_ctx:
        if meta is None and autotune_enabled():
            autotuned[lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), 1)](*args, **flags)
            _TUNED_META[tune_key] = autotuned.best_config.all_kwargs()
        else:
            if config is not None:
                meta = config
            elif meta is None:
                meta = _TUNED_META[tune_key] = _tiled_meta(m, n)
            tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
            split = meta.get("SPLIT_K", 1)
            if split > 1:
                buffers = _split_k_workspace(a.device, tiles * meta["BLOCK_M"] * meta["BLOCK_N"], tiles)
                if buffers is None:  # capturing a CUDA graph with too small a workspace: no split this call
                    meta, split = {**meta, "SPLIT_K": 1}, 1
                else:
                    args[6:8] = buffers
            autotuned.fn[(tiles, split)](*args, **flags, **meta)
    return c


def _tiled_meta(m: int, n: int) -> dict:
    """The pre-tuned tiled-kernel config for M (narrow tiles for decode-sized M on narrow layers), or the one
    `_TILED_BY_WIDTH` gives for M's range and the output width N (possibly split over K)."""
    table = _TILED_PRETUNED_NARROW if (m <= 16 and n <= 4096) else _TILED_PRETUNED
    meta = _pretuned_meta(table, m)
    for (lo, hi, n_min, n_max), tile in _TILED_BY_WIDTH.items():
        if lo <= m <= hi and n_min <= n <= n_max:
            meta = _tile_meta(*tile)
    return meta


def _stream_key(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


_SPLIT_K_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_RETIRED_WORKSPACES: list[tuple[torch.Tensor, torch.Tensor]] = []  # CUDA graphs may still hold their addresses


def _split_k_workspace(device: torch.device, partial_numel: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Zeroed int32 partial tiles and arrival counts for split-K, one pair per device and stream. Every split-K call
    leaves them zeroed again (the last program of each tile clears its part), so no memset runs per call. Grown on
    demand outside CUDA-graph capture (None while capturing with too small a pair); replaced pairs are kept alive."""
    key = (device, _stream_key(device))
    have = _SPLIT_K_WORKSPACE.get(key)
    if have is not None and have[0].numel() >= partial_numel and have[1].numel() >= tiles:
        return have
    if _capturing(device):
        return None
    if have is not None:
        _RETIRED_WORKSPACES.append(have)
    numel = max(partial_numel, have[0].numel() if have else 0)
    count = max(tiles, have[1].numel() if have else 0)
    have = (torch.zeros(numel, dtype=torch.int32, device=device), torch.zeros(count, dtype=torch.int32, device=device))
    _SPLIT_K_WORKSPACE[key] = have
    return have


# Pre-tuned launch configs: the winners of `bench/gemm_int8.py --autotune` on an H100 (Triton 3.6) at the
# Llama-3-8B shapes, keyed on the smallest M they serve: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages).
# With them the first call of a new shape launches at once; HF_OUTLIERTUNE_AUTOTUNE=1 searches all configs.
_TILED_PRETUNED = {
    1: (16, 64, 512, 4, 3),
    33: (16, 64, 256, 4, 4),
    65: (64, 64, 128, 4, 5),
    1024: (128, 256, 128, 8, 3),
}
_TILED_PRETUNED_NARROW = {1: (16, 16, 512, 4, 4)}  # N ≤ 4096 at decode sizes: more programs than SMs
# Tiles by (smallest M, largest M, smallest N, largest N): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K).
# At M = 33-64 one 64-row tile reads each weight byte once (16-row tiles re-read it from L2 four times). Swept on an
# H100 at M = 64 with per-token scales (docs/gemm_int8_m64_tiles_h100.json; bf16 in the same run):
# N = 4096: 64×32 with 5 stages, 4096×4096 1.33x → 1.61x and 14336×4096 1.54x → 1.84x; N = 6144: 64×64 unsplit,
# 1.53x → 1.70x; N = 14336: 64×64 split in two along K stays the best (1.78x; 1.13x unsplit with 16 rows,
# docs/gemm_int8_split_k_h100.json).
_TILED_BY_WIDTH: dict[tuple[int, int, int, int], tuple] = {
    (33, 64, 4096, 6143): (64, 32, 256, 4, 5, 1),
    (33, 64, 6144, 14335): (64, 64, 256, 4, 4, 1),
    (33, 64, 14336, 2**31): (64, 64, 256, 4, 3, 2),
}
_TMA_PRETUNED = {1: (128, 128, 128, 4, 4), 1024: (256, 128, 128, 8, 3)}
# Warp-specialized tiles serve 2-byte outputs, static and per-token inputs alike. 128×256×128 with 4 warps per
# consumer group was the fastest of 13 tiles at M = 2048 on all four shapes (`docs/int8_tma_warp_specialize_h100.json`)
# and of 5 with per-token scales at M = 2048 and 8192 (`docs/int8_tma_ws_dynamic_h100.json`).
_TMA_PRETUNED_WS = {1: (128, 128, 128, 4, 4), 1024: (128, 256, 128, 4, 3)}
# Where a tile leaves the SMs' last round of tiles less than `_TMA_MIN_FILL` full, the next narrower one serves if it
# fills that round better: k/v (N = 1024) at M = 2048 has 64 tiles of 128×256 for 132 SMs (0.91x bf16 with them,
# 1.34x with 128×128); 4096×14336 at M = 1024 has 448, 3.4 rounds (1.45x with them, 1.68x with 128×128;
# `docs/int8_tma_ws_dynamic_h100.json`, per-token scales).
_TMA_NARROW = {False: (128, 128, 128, 4, 4), True: (128, 128, 256, 4, 3)}  # keyed by warp specialization
_TMA_NARROWEST = (64, 128, 128, 4, 4)
_TMA_MIN_FILL = 0.9


def autotune_enabled() -> bool:
    """Search every config for each new shape (HF_OUTLIERTUNE_AUTOTUNE=1) instead of the pre-tuned table.
    Under the interpreter there is a single config either way."""
    return _interpret_mode() or os.environ.get("HF_OUTLIERTUNE_AUTOTUNE") == "1"


def _tile_meta(bm: int, bn: int, bk: int, warps: int, stages: int, split: int | None = None) -> dict:
    """Launch meta-parameters of one tile tuple (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages[, SPLIT_K])."""
    meta = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": warps, "num_stages": stages}
    return meta if split is None else {**meta, "SPLIT_K": split}


def _pretuned_meta(table: dict[int, tuple], m: int) -> dict:
    """The tile of `table` (keyed on the smallest M it serves) for M."""
    return _tile_meta(*table[max(b for b in table if b <= max(m, 1))])


# ----------------------------------------------------------------------------------------------------
# GEMV (decode, a few rows of codes): each program streams BLOCK_N weight rows once as int32 words (four
# codes each) and meets every word with the matching word of its activation row in one DP4A (four
# int8 products summed into the int32 accumulator, exact). No tile is padded to 16 rows, and narrow
# layers (k/v, N = 1024) still get hundreds of programs.
# ----------------------------------------------------------------------------------------------------


def _dp4a_impl(a, b, c, USE_ASM: tl.constexpr):
    """c + Σ_i a_i · b_i over the four signed bytes of the int32 words a and b (one DP4A on the GPU)."""
    if USE_ASM:
        return tl.inline_asm_elementwise(
            "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1,
        )
    for i in tl.static_range(4):  # byte i, sign-extended: shift it to the top, then arithmetic-shift down
        c += ((a << (24 - 8 * i)) >> 24) * ((b << (24 - 8 * i)) >> 24)
    return c


def _int8_gemv_kernel(
    a_ptr, w_ptr, c_ptr, w_scale_ptr, a_scale_ptr, bias_ptr,
    M, N, KW,
    stride_am, stride_wn,  # in int32 words, like KW (= K / 4)
    stride_cm, stride_cn,
    stride_ws, stride_as, stride_bias,
    HAS_A_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_ASM: tl.constexpr,
    EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr,  # weight rows a program
    BLOCK_K: tl.constexpr,  # int32 words of K a step
):
    """`_int8_matmul_kernel`'s result for one row m of a and BLOCK_N rows of w (program (m, n-block)).

    m is the fastest grid axis, so the programs of one weight block run together and all but the first
    find it in L2."""
    m = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    offs_wn = (offs_n % N).to(tl.int64)  # rows past N wrap around; their results are masked at the store
    # a as a (BLOCK_N, BLOCK_K) tile of identical rows: loaded straight into w's register layout (each thread
    # reads the words its weight words meet, from L1 after the first row), where a (BLOCK_K,) load would be
    # redistributed through shared memory with two barriers every step.
    a_ptrs = a_ptr + m.to(tl.int64) * stride_am + (offs_k[None, :] + 0 * offs_n[:, None])
    w_ptrs = w_ptr + offs_wn[:, None] * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.int32)
    for k0 in range(0, KW, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs, eviction_policy="evict_first")
        else:
            a = tl.load(a_ptrs, mask=offs_k[None, :] < KW - k0, other=0)
            w = tl.load(w_ptrs, mask=offs_k[None, :] < KW - k0, other=0, eviction_policy="evict_first")
        acc = _dp4a(w, a, acc, USE_ASM)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    # The tiled kernel's epilogue, in the reference's order: (acc · w_scale) · a_scale + bias.
    mask_n = offs_n < N
    y = tl.sum(acc, axis=1).to(tl.float32)
    y = y * tl.load(w_scale_ptr + offs_n * stride_ws, mask=mask_n, other=0.0).to(tl.float32)
    if HAS_A_SCALE:
        y = y * tl.load(a_scale_ptr + m * stride_as).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + offs_n * stride_bias, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(c_ptr + m.to(tl.int64) * stride_cm + offs_n * stride_cn, y.to(c_ptr.dtype.element_ty), mask=mask_n)


@functools.cache
def _jitted_gemv_kernel(interpret: bool):
    """The GEMV, jitted once per mode with its `_dp4a` helper (`interpret` only keys the cache: see above)."""
    global _dp4a
    _dp4a = triton.jit(_dp4a_impl)
    return triton.heuristics({"EVEN_K": lambda args: args["KW"] % args["BLOCK_K"] == 0})(
        triton.jit(_int8_gemv_kernel))


# Up to this many rows the GEMV serves; from 4 rows the tiled tensor-core kernel is as fast or faster
# (`bench/gemm_int8.py --sweep-gemv`, H100: 4 rows 8.8-26.4 µs against its 9.3-25.1 µs).
GEMV_MAX_M = 2
# The GEMV tile: within 3 % (1 row) and 6 % (2 rows) of the best of 40 tiles at each Llama-3-8B shape, k/v included
# (`docs/int8_gemv_sweep_h100.json`).
GEMV_CONFIG = {"BLOCK_N": 2, "BLOCK_K": 512, "num_warps": 4}


def gemv_supported(a: torch.Tensor, w: torch.Tensor) -> bool:
    """The GEMV reads a and w as int32 words: K a multiple of 4, unit K strides, word-aligned rows and starts."""
    return all(t.stride(1) == 1 and t.stride(0) % 4 == 0 and t.storage_offset() % 4 == 0 for t in (a, w)) \
        and a.shape[1] % 4 == 0


def int8_gemv_triton(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
    config: dict | None = None,
) -> torch.Tensor:
    """`int8_matmul_reference` as the DP4A GEMV (see `gemv_supported` for its layout needs); `config`
    (BLOCK_N, BLOCK_K, num_warps) overrides the pre-tuned one (tests, sweeps)."""
    _check_inputs(a, w, w_scale, a_scale, bias, out_dtype)
    _check_launchable("int8_gemv_triton", a)
    if not gemv_supported(a, w):
        raise ValueError("int8_gemv_triton reads a and w as int32 words: it needs K % 4 == 0, unit K strides and "
                         "row strides and offsets that are multiples of 4; use int8_matmul_triton")
    (m, k), n = a.shape, w.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    a32, w32 = a.view(torch.int32), w.view(torch.int32)
    a_scale_arg = a_scale if a_scale is not None else w_scale
    bias_arg = bias if bias is not None else w_scale
    meta = config or ({"BLOCK_N": 4, "BLOCK_K": 16, "num_warps": 1} if _interpret_mode() else GEMV_CONFIG)
    kernel = _jitted_gemv_kernel(_interpret_mode())
    device_ctx = contextlib.nullcontext()
    if a.is_cuda and a.device.index != torch.cuda.current_device():
        device_ctx = torch.cuda.device(a.device)
    with device_ctx:
        kernel[(m, triton.cdiv(n, meta["BLOCK_N"]))](
            a32, w32, c, w_scale, a_scale_arg, bias_arg,
            m, n, k // 4,
            a32.stride(0), w32.stride(0), c.stride(0), c.stride(1),
            w_scale.stride(0), a_scale_arg.stride(0), bias_arg.stride(0),
            HAS_A_SCALE=a_scale is not None, HAS_BIAS=bias is not None, USE_ASM=not _interpret_mode(), **meta,
        )
    return c


# ----------------------------------------------------------------------------------------------------
# Persistent TMA kernel (Hopper+, large M): one program per SM walks the output tiles; operands arrive
# through tensor-memory-accelerator descriptors (out-of-bounds reads are zero-filled, stores clipped).
# ----------------------------------------------------------------------------------------------------


def _tile_origin_impl(tile_id, num_pid_m, num_pid_n, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      GROUP_M: tl.constexpr):
    """(first row, first column) of output tile `tile_id`, with GROUP_M row tiles sharing their columns."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    group_size_m = min(num_pid_m - group_id * GROUP_M, GROUP_M)
    pid_m = group_id * GROUP_M + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


def _int8_matmul_tma_kernel(
    a_ptr, w_ptr, c_ptr, w_scale_ptr, a_scale_ptr, bias_ptr,
    M, N, K,
    M_BUCKET, N_BUCKET, K_BUCKET,  # autotune keys only
    NUM_SMS: tl.constexpr,
    HAS_A_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """`_int8_matmul_kernel` for contiguous operands, persistent over tiles, with TMA loads and stores.

    WARP_SPECIALIZE: triton splits each tile's work between a producer warp group (TMA loads into the
    shared-memory ring) and consumer warp groups (wgmma and the epilogue), so loads, MMAs and the epilogue
    of consecutive tiles overlap (Hopper; the interpreter ignores it)."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[K, 1], block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[K, 1], block_shape=[BLOCK_N, BLOCK_K])
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[N, 1], block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    # The epilogue finds its tile from its own counter, not from the loads' tile_id: under warp specialization
    # the loads run a tile ahead, and an epilogue that shared their offsets took another tile's row scales.
    epilogue_tile = tl.program_id(0) - NUM_SMS
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=not WARP_SPECIALIZE,
                            warp_specialize=WARP_SPECIALIZE):
        off_m, off_n = _tile_origin(tile_id, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        for ki in range(k_tiles):
            a = a_desc.load([off_m, ki * BLOCK_K])
            w = w_desc.load([off_n, ki * BLOCK_K])
            acc = tl.dot(a, w.T, acc, out_dtype=tl.int32)
        epilogue_tile += NUM_SMS
        off_m, off_n = _tile_origin(epilogue_tile, num_pid_m, num_pid_n, BLOCK_M, BLOCK_N, GROUP_M)
        offs_m = off_m + tl.arange(0, BLOCK_M)
        offs_n = off_n + tl.arange(0, BLOCK_N)
        y = acc.to(tl.float32) * tl.load(w_scale_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        if HAS_A_SCALE:
            y = y * tl.load(a_scale_ptr + offs_m, mask=offs_m < M, other=0.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            y = y + tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        c_desc.store([off_m, off_n], y.to(c_desc.dtype))


def _tma_configs() -> list:
    if _interpret_mode():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "WARP_SPECIALIZE": False},
                              num_warps=1, num_stages=1)]
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "WARP_SPECIALIZE": ws},
                      num_warps=w, num_stages=s)
        for bm, bn, bk, w, s, ws in (
            (128, 256, 128, 4, 3, True), (128, 128, 256, 4, 3, True), (128, 128, 128, 4, 4, True),
            (128, 256, 128, 8, 3, False), (128, 256, 64, 8, 4, False), (128, 128, 128, 8, 4, False),
            (128, 128, 128, 4, 4, False), (256, 128, 128, 8, 3, False), (64, 256, 128, 4, 4, False),
        )
    ]


@functools.cache
def _jitted_tma_kernel(interpret: bool):
    """The persistent kernel, jitted once per mode with its `_tile_origin` helper."""
    global _tile_origin
    _tile_origin = triton.jit(_tile_origin_impl)
    return triton.autotune(
        configs=_tma_configs(),
        key=["M_BUCKET", "N_BUCKET", "K_BUCKET", "HAS_A_SCALE", "HAS_BIAS"],
        prune_configs_by={"early_config_prune": _prune_configs},
    )(triton.jit(_int8_matmul_tma_kernel))


def tma_supported(a: torch.Tensor, w: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """TMA needs contiguous operands with 16-byte aligned rows, a Hopper-class GPU (or the interpreter) and a triton
    with device-side tensor descriptors and warp-specialized loops (3.4+)."""
    if triton is None or not hasattr(tl, "make_tensor_descriptor") or not _range_warp_specializes():
        return False
    if a.is_cuda and _device_info(a.device)[0] < 9:
        return False
    out_bytes = out_dtype.itemsize
    return a.is_contiguous() and w.is_contiguous() and a.shape[1] % 16 == 0 and (w.shape[0] * out_bytes) % 16 == 0


@functools.cache
def _range_warp_specializes() -> bool:
    """Whether this triton's `tl.range` takes `warp_specialize` (the TMA kernel passes it)."""
    return "warp_specialize" in inspect.signature(tl.range.__init__).parameters


@functools.lru_cache(maxsize=None)
def _device_info(device: torch.device) -> tuple[int, int]:
    """(compute-capability major, SM count) of a CUDA device, queried once (the launch path is host-bound)."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.multi_processor_count


def _tma_allocator(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _install_tma_allocator() -> None:
    """Device-side tensor descriptors need global scratch memory from triton's allocator hook."""
    triton.set_allocator(_tma_allocator)


def int8_matmul_tma(
    a: torch.Tensor,
    w: torch.Tensor,
    w_scale: torch.Tensor,
    a_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """`int8_matmul_reference` as the persistent TMA kernel (see `tma_supported` for its requirements)."""
    _check_inputs(a, w, w_scale, a_scale, bias, out_dtype)
    if not tma_supported(a, w, out_dtype):
        raise ValueError("int8_matmul_tma needs contiguous a and w, K % 16 == 0, 16-byte output rows and sm90+")
    (m, k), n = a.shape, w.shape[0]
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if a.is_cuda:
        _install_tma_allocator()
        num_sms = _device_info(a.device)[1]
    else:
        num_sms = 4
    w_scale = w_scale.contiguous()
    a_scale_arg = a_scale.contiguous() if a_scale is not None else w_scale
    bias_arg = bias.contiguous() if bias is not None else w_scale
    args = (a, w, c, w_scale, a_scale_arg, bias_arg, m, n, k, _bucket(m), _bucket(n), _bucket(k))
    flags = {"HAS_A_SCALE": a_scale is not None, "HAS_BIAS": bias is not None, "NUM_SMS": num_sms}
    kernel = _jitted_tma_kernel(_interpret_mode())

    def grid(meta):
        return (min(num_sms, triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])),)

    if autotune_enabled():
        kernel[grid](*args, **flags)
        _TUNED_META[("tma", *args[-3:], *flags.values(), out_dtype)] = kernel.best_config.all_kwargs()
    else:
        warp_specialize = out_dtype.itemsize == 2 and not _interpret_mode()
        meta = _tma_meta(m, n, warp_specialize, num_sms)
        kernel.fn[grid(meta)](*args, **flags, **meta)
    return c


def _tma_meta(m: int, n: int, warp_specialize: bool, num_sms: int) -> dict:
    """The pre-tuned persistent tile for M, or a narrower one where that fills the SMs' last round of tiles better."""
    def filled(meta: dict) -> float:
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return tiles / (triton.cdiv(tiles, num_sms) * num_sms)

    meta = _pretuned_meta(_TMA_PRETUNED_WS if warp_specialize else _TMA_PRETUNED, m)
    for narrower in (_TMA_NARROW[warp_specialize], _TMA_NARROWEST):
        candidate = _tile_meta(*narrower)
        if filled(meta) < _TMA_MIN_FILL and filled(candidate) > filled(meta):
            meta = candidate
    return {**meta, "WARP_SPECIALIZE": warp_specialize}


# ----------------------------------------------------------------------------------------------------
# The CUDA entry point as a torch custom op: opaque to torch.compile (with a fake for shape propagation)
# and free of host syncs, so it can be captured in CUDA graphs once autotuning has run.
# ----------------------------------------------------------------------------------------------------

TMA_MIN_M = 1024  # from this many tokens the persistent TMA kernel wins; below it the tiled kernel


def int8_matmul_cuda(a, w, w_scale, a_scale, bias, out_dtype) -> torch.Tensor:
    """Kernel choice on the GPU: the GEMV for up to `GEMV_MAX_M` rows (word-aligned operands), persistent TMA
    for prefill-sized M, the tiled kernel otherwise."""
    if a.shape[0] <= GEMV_MAX_M and gemv_supported(a, w):
        return int8_gemv_triton(a, w, w_scale, a_scale, bias, out_dtype)
    if a.shape[0] >= TMA_MIN_M and tma_supported(a, w, out_dtype):
        return int8_matmul_tma(a, w, w_scale, a_scale, bias, out_dtype)
    return int8_matmul_triton(a, w, w_scale, a_scale, bias, out_dtype)


@torch.library.custom_op(
    "hf_outliertune::int8_matmul",
    mutates_args=(),
    schema="(Tensor a, Tensor w, Tensor w_scale, Tensor? a_scale, Tensor? bias, ScalarType out_dtype) -> Tensor",
)
def _int8_matmul_op(a, w, w_scale, a_scale, bias, out_dtype):
    return int8_matmul_cuda(a, w, w_scale, a_scale, bias, out_dtype)


@_int8_matmul_op.register_fake
def _(a, w, w_scale, a_scale, bias, out_dtype):
    return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)
