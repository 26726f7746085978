"""The Triton int8 GEMM (`int8_matmul_triton`) against its pure-PyTorch specification.

Without a GPU the kernel runs under Triton's interpreter on CPU tensors: TRITON_INTERPRET=1 is set
below before triton is first imported (the kernel is jitted lazily, so the order of test-module
imports does not matter either). With a GPU the same tests run the compiled kernel on CUDA tensors,
and `test_gpu_realistic_shape` adds a model-sized GEMM.

Tolerances: the int32 accumulation must match exactly; the fp32 epilogue within rtol 1e-6 / atol 1e-5
(identical under the interpreter; on the GPU the compiler may fuse `y·a_scale + bias` into one FMA,
which moves the last bit); bf16/fp16 outputs within one unit of their last place.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    # Before triton is imported: there is no other way to run a Triton kernel on this machine.
    os.environ["TRITON_INTERPRET"] = "1"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

pytest.importorskip("triton", reason="triton is not installed: the Triton int8 GEMM cannot run here")

from hf_outliertune.kernels.int8_matmul import (  # noqa: E402
    gemv_supported,
    int8_gemv_triton,
    int8_matmul,
    int8_matmul_cuda,
    int8_matmul_reference,
    int8_matmul_triton,
)

# The module itself (the package re-exports the function `int8_matmul` under the same name).
mod = importlib.import_module("hf_outliertune.kernels.int8_matmul")

DEVICE = "cuda" if CUDA else "cpu"
SHAPES = [(1, 32, 16), (5, 40, 24), (17, 64, 33), (32, 96, 48)]  # (M, K, N)
SHAPE_IDS = [f"M{m}-K{k}-N{n}" for m, k, n in SHAPES]
FP32_TOL = dict(rtol=1e-6, atol=1e-5)
LOW_TOL = {torch.bfloat16: dict(rtol=8e-3, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-5)}


def _codes(*shape, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=g).to(DEVICE)


def _operands(m: int, k: int, n: int, *, a_scale: bool, bias: bool, bias_dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    a, w = _codes(m, k, seed=seed), _codes(n, k, seed=seed + 2)
    w_scale = (torch.rand(n, generator=g) * 1e-2 + 1e-4).to(DEVICE)
    a_s = (torch.rand(m, generator=g) * 0.1 + 1e-3).to(DEVICE) if a_scale else None
    b = torch.randn(n, generator=g).to(DEVICE, bias_dtype) if bias else None
    return a, w, w_scale, a_s, b


@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
def test_int32_accumulation_is_exact(m, k, n):
    # w_scale = 1 and no epilogue: the output is the int32 sum itself, exact in fp32 (|Σ| ≤ 128²·96 < 2^24).
    a, w = _codes(m, k, seed=m), _codes(n, k, seed=n)
    ones = torch.ones(n, device=DEVICE)
    y = int8_matmul_triton(a, w, ones)
    exact = (a.double() @ w.double().t()).float()
    assert y.dtype == torch.float32 and y.shape == (m, n)
    assert torch.equal(y, exact)
    assert torch.equal(y, int8_matmul_reference(a, w, ones))


@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("has_a_scale", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
def test_fp32_epilogue(m, k, n, has_a_scale, has_bias):
    args = _operands(m, k, n, a_scale=has_a_scale, bias=has_bias, seed=m + k + n)
    y = int8_matmul_triton(*args, out_dtype=torch.float32)
    torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=torch.float32), **FP32_TOL)


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("m,k,n", SHAPES, ids=SHAPE_IDS)
def test_low_precision_output(m, k, n, out_dtype):
    # The module passes the activation dtype as out_dtype and keeps the bias in it.
    args = _operands(m, k, n, a_scale=True, bias=True, bias_dtype=out_dtype, seed=3 * m + n)
    y = int8_matmul_triton(*args, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=out_dtype), **LOW_TOL[out_dtype])


def test_float64_output_and_half_scales():
    a, w, w_scale, a_scale, bias = _operands(5, 40, 24, a_scale=True, bias=True, bias_dtype=torch.float16)
    args = (a, w, w_scale.half(), a_scale.bfloat16(), bias)
    y = int8_matmul_triton(*args, out_dtype=torch.float64)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=torch.float64), **FP32_TOL)


@pytest.mark.parametrize("layout", ["a_col_stride", "a_row_stride", "w_transposed", "scales_strided"])
def test_non_contiguous_operands(layout):
    m, k, n = 17, 40, 24
    a, w, w_scale, a_scale, bias = _operands(m, k, n, a_scale=True, bias=True, seed=7)
    if layout == "a_col_stride":  # a slice with stride 2 along K
        big = _codes(m, 2 * k, seed=11)
        a = big[:, ::2]
    elif layout == "a_row_stride":  # every third row of a larger buffer, offset into it
        big = _codes(3 * m + 1, k + 8, seed=12)
        a = big[1::3, 4 : 4 + k]
    elif layout == "w_transposed":  # w stored (K, N): stride_wk = N, stride_wn = 1
        w = _codes(k, n, seed=13).t()
    else:  # scales and bias as views with stride 2
        w_scale = torch.stack([w_scale, w_scale + 1], dim=1)[:, 0]
        a_scale = torch.stack([a_scale, a_scale + 1], dim=1)[:, 0]
        bias = torch.stack([bias - 1, bias], dim=1)[:, 1]
    assert not all(t.is_contiguous() for t in (a, w, w_scale, a_scale, bias))
    y = int8_matmul_triton(a, w, w_scale, a_scale, bias)
    torch.testing.assert_close(y, int8_matmul_reference(a, w, w_scale, a_scale, bias), **FP32_TOL)


SPLIT_SHAPES = [(5, 200, 24), (33, 96, 40), (16, 512, 16)]  # K not a multiple of the K range; ragged M/N tiles


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("m,k,n", SPLIT_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in SPLIT_SHAPES])
def test_split_k_is_exact_and_leaves_its_workspace_zeroed(m, k, n, split):
    """Split-K sums int32 partial tiles with atomics: the result equals the one-program kernel's bit for bit, and
    the workspace (partial tiles and arrival counts) is zero again after every call, so the next call needs no
    memset. Run twice to catch a count or a partial tile left behind."""
    args = _operands(m, k, n, a_scale=True, bias=True, seed=m * k + split)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 1, "num_stages": 1}
    whole = int8_matmul_triton(*args, config=cfg)
    for _ in range(2):
        y = int8_matmul_triton(*args, config={**cfg, "SPLIT_K": split})
        assert torch.equal(y, whole)
        partial, arrived = mod._SPLIT_K_WORKSPACE[(args[0].device, mod._stream_key(args[0].device))]
        assert not partial.any() and not arrived.any()
    torch.testing.assert_close(whole, int8_matmul_reference(*args), **FP32_TOL)


def test_medium_m_tiles_by_output_width():
    """M = 33-64: one 64-row tile; split over K only on the widest outputs (4096×14336 at M = 64 on an H100)."""
    assert mod._tiled_meta(64, 14336).get("SPLIT_K") == 2 and mod._tiled_meta(40, 28672).get("SPLIT_K") == 2
    assert (mod._tiled_meta(64, 4096)["BLOCK_M"], mod._tiled_meta(64, 4096)["BLOCK_N"]) == (64, 32)
    assert (mod._tiled_meta(33, 6144)["BLOCK_M"], mod._tiled_meta(33, 6144)["BLOCK_N"]) == (64, 64)
    for m, n in ((64, 4096), (40, 6144), (16, 14336), (65, 14336), (2048, 14336), (64, 1024)):
        assert mod._tiled_meta(m, n).get("SPLIT_K", 1) == 1
    assert mod._tiled_meta(64, 1024)["BLOCK_M"] == 16  # k/v keeps the 16-row tiles (not swept)


def test_split_k_workspace_does_not_grow_during_graph_capture(monkeypatch):
    """While a CUDA graph is being captured no buffer can be allocated: too small a workspace means no split."""
    args = _operands(5, 64, 24, a_scale=False, bias=False, seed=3)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 1, "num_stages": 1, "SPLIT_K": 2}
    monkeypatch.setattr(mod, "_SPLIT_K_WORKSPACE", {})
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    device = torch.device("cuda") if CUDA else torch.device("cpu")
    if not CUDA:  # the check is for CUDA devices; emulate one capturing on the CPU interpreter's behalf
        monkeypatch.setattr(mod, "_capturing", lambda dev: True)
    assert mod._split_k_workspace(device, 4096, 8) is None
    y = int8_matmul_triton(*args, config=cfg)  # runs unsplit
    torch.testing.assert_close(y, int8_matmul_reference(*args), **FP32_TOL)


def test_tuned_config_is_reused(monkeypatch):
    # The second call with the same autotune key launches the jitted kernel with the remembered config.
    args = _operands(9, 72, 40, a_scale=True, bias=True, seed=9)
    first = int8_matmul_triton(*args)
    assert any(key[:3] == (16, 64, 128) for key in mod._TUNED_META)
    autotuned = mod._jitted_kernel(INTERPRET)

    def no_autotune(*a, **k):
        raise AssertionError("the Autotuner ran for a key it had already tuned")

    monkeypatch.setattr(autotuned, "run", no_autotune)
    assert torch.equal(int8_matmul_triton(*args), first)


def test_empty_m():
    a, w, w_scale, _, _ = _operands(1, 32, 16, a_scale=False, bias=False)
    y = int8_matmul_triton(a[:0], w, w_scale)
    assert y.shape == (0, 16)


@pytest.mark.parametrize(
    "case,exc,match",
    [
        ("a_float", TypeError, "a must be a 2-D int8"),
        ("w_1d", TypeError, "w must be a 2-D int8"),
        ("k_mismatch", ValueError, "inner dimensions differ"),
        ("w_scale_shape", ValueError, r"w_scale must have shape \(N,\)"),
        ("w_scale_int", TypeError, "w_scale must be a floating-point"),
        ("a_scale_shape", ValueError, r"a_scale must have shape \(M,\)"),
        ("bias_shape", ValueError, r"bias must have shape \(N,\)"),
        ("out_int", TypeError, "out_dtype must be one of"),
    ],
)
def test_input_validation(case, exc, match):
    a, w, w_scale, a_scale, bias = _operands(5, 32, 16, a_scale=True, bias=True)
    kw = dict(a=a, w=w, w_scale=w_scale, a_scale=a_scale, bias=bias, out_dtype=torch.float32)
    if case == "a_float":
        kw["a"] = a.float()
    elif case == "w_1d":
        kw["w"] = w[0]
    elif case == "k_mismatch":
        kw["w"] = _codes(16, 40, seed=1)
    elif case == "w_scale_shape":
        kw["w_scale"] = w_scale[:-1]
    elif case == "w_scale_int":
        kw["w_scale"] = torch.ones(16, dtype=torch.int32, device=DEVICE)
    elif case == "a_scale_shape":
        kw["a_scale"] = a_scale[:, None]
    elif case == "bias_shape":
        kw["bias"] = torch.zeros(17, device=DEVICE)
    elif case == "out_int":
        kw["out_dtype"] = torch.int32
    with pytest.raises(exc, match=match):
        int8_matmul_triton(**kw)


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("int8_matmul dispatched CPU tensors to the Triton kernel")

    monkeypatch.setattr(mod, "int8_matmul_triton", must_not_run)
    g = torch.Generator().manual_seed(5)
    a = torch.randint(-128, 128, (3, 40), dtype=torch.int8, generator=g)
    w = torch.randint(-128, 128, (24, 40), dtype=torch.int8, generator=g)
    w_scale, a_scale, bias = torch.rand(24, generator=g), torch.rand(3, generator=g), torch.randn(24, generator=g)
    y = int8_matmul(a, w, w_scale, a_scale, bias, out_dtype=torch.bfloat16)
    assert torch.equal(y, int8_matmul_reference(a, w, w_scale, a_scale, bias, out_dtype=torch.bfloat16))


def test_without_triton_reference_still_serves(monkeypatch):
    # As on a machine where `import triton` failed (macOS): the dispatcher uses the reference,
    # and the Triton entry point says why it cannot run.
    monkeypatch.setattr(mod, "triton", None)
    a, w = torch.ones(2, 32, dtype=torch.int8), torch.ones(16, 32, dtype=torch.int8)
    assert torch.equal(int8_matmul(a, w, torch.ones(16)), torch.full((2, 16), 32.0))
    with pytest.raises(RuntimeError, match="needs triton"):
        int8_matmul_triton(a, w, torch.ones(16))


def test_autotune_configs(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    (only,) = mod._int8_matmul_configs()
    assert (only.kwargs["BLOCK_M"], only.kwargs["BLOCK_N"], only.kwargs["BLOCK_K"]) == (16, 16, 32)

    monkeypatch.delenv("TRITON_INTERPRET")
    configs = mod._int8_matmul_configs()
    assert len(configs) > 4
    for c in configs:  # int8 tl.dot needs M, N ≥ 16 and K ≥ 32
        assert c.kwargs["BLOCK_M"] >= 16 and c.kwargs["BLOCK_N"] >= 16 and c.kwargs["BLOCK_K"] >= 32
    decode = mod._prune_configs(configs, {"M_BUCKET": mod._bucket(1)})
    assert decode and all(c.kwargs["BLOCK_M"] == 16 for c in decode)
    assert len(mod._prune_configs(configs, {"M_BUCKET": mod._bucket(3000)})) == len(configs)
    assert [mod._bucket(x) for x in (1, 2, 3, 16, 17, 4096)] == [1, 2, 4, 16, 32, 4096]


# The DP4A GEMV (decode): K % 4 == 0 (int32 words); KW = K / 4 not a multiple of the interpreter's BLOCK_K = 16
# words exercises the masked K tail, N not a multiple of BLOCK_N = 4 the wrapped rows.
GEMV_SHAPES = [(1, 64, 16), (2, 40, 24), (3, 100, 33), (4, 256, 7)]
GEMV_IDS = [f"M{m}-K{k}-N{n}" for m, k, n in GEMV_SHAPES]


@pytest.mark.parametrize("m,k,n", GEMV_SHAPES, ids=GEMV_IDS)
def test_gemv_int32_accumulation_is_exact(m, k, n):
    a, w = _codes(m, k, seed=m + 40), _codes(n, k, seed=n + 41)
    ones = torch.ones(n, device=DEVICE)
    y = int8_gemv_triton(a, w, ones)
    assert y.shape == (m, n) and torch.equal(y, (a.double() @ w.double().t()).float())


def test_gemv_extreme_codes_are_exact():
    # Every product is (−128)·(−128) or (−128)·127: the sign extension of each byte inside a word matters.
    k, n = 256, 8
    a = torch.full((2, k), -128, dtype=torch.int8, device=DEVICE)
    a[1, 1::2] = 127
    w = torch.full((n, k), -128, dtype=torch.int8, device=DEVICE)
    w[::2, 2::4] = 127
    ones = torch.ones(n, device=DEVICE)
    assert torch.equal(int8_gemv_triton(a, w, ones), (a.double() @ w.double().t()).float())


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("has_a_scale", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("m,k,n", GEMV_SHAPES, ids=GEMV_IDS)
def test_gemv_epilogue(m, k, n, has_a_scale, out_dtype):
    args = _operands(m, k, n, a_scale=has_a_scale, bias=True, bias_dtype=out_dtype, seed=5 * m + n)
    y = int8_gemv_triton(*args, out_dtype=out_dtype)
    tol = FP32_TOL if out_dtype == torch.float32 else LOW_TOL[out_dtype]
    assert y.dtype == out_dtype
    torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=out_dtype), **tol)


@pytest.mark.parametrize("block_n,block_k", [(1, 8), (2, 16), (8, 32)])
def test_gemv_tiles(block_n, block_k):
    args = _operands(3, 100, 19, a_scale=True, bias=True, seed=block_n)
    y = int8_gemv_triton(*args, config={"BLOCK_N": block_n, "BLOCK_K": block_k, "num_warps": 1})
    torch.testing.assert_close(y, int8_matmul_reference(*args), **FP32_TOL)


def test_gemv_row_strided_activations():
    # Every other row of a wider buffer, starting 8 codes in: row stride and offset are whole words.
    big = _codes(7, 72, seed=50)
    a = big[::2, 8:72]
    _, w, w_scale, _, bias = _operands(4, 64, 24, a_scale=False, bias=True, seed=51)
    assert gemv_supported(a, w) and not a.is_contiguous()
    y = int8_gemv_triton(a, w, w_scale, None, bias)
    torch.testing.assert_close(y, int8_matmul_reference(a, w, w_scale, None, bias), **FP32_TOL)


@pytest.mark.parametrize("layout", ["k_not_word", "a_col_stride", "a_odd_offset", "w_transposed"])
def test_gemv_refuses_layouts_it_cannot_read_as_words(layout):
    a, w, w_scale, _, _ = _operands(2, 64, 16, a_scale=False, bias=False, seed=52)
    if layout == "k_not_word":
        a, w = a[:, :62].contiguous(), w[:, :62].contiguous()
    elif layout == "a_col_stride":
        a = _codes(2, 128, seed=53)[:, ::2]
    elif layout == "a_odd_offset":
        a = _codes(2, 66, seed=54)[:, 1:65]
    else:
        w = _codes(64, 16, seed=55).t()
    assert not gemv_supported(a, w)
    with pytest.raises(ValueError, match="int32 words.*use int8_matmul_triton"):
        int8_gemv_triton(a, w, w_scale)


def test_device_dispatch_picks_gemv_for_few_word_aligned_rows(monkeypatch):
    calls = []
    monkeypatch.setattr(mod, "int8_gemv_triton", lambda *a, **k: calls.append("gemv"))
    monkeypatch.setattr(mod, "int8_matmul_triton", lambda *a, **k: calls.append("tiled"))
    _, w, w_scale, _, _ = _operands(1, 64, 16, a_scale=False, bias=False)
    for m in (1, mod.GEMV_MAX_M, mod.GEMV_MAX_M + 1):
        int8_matmul_cuda(_codes(m, 64, seed=m), w, w_scale, None, None, torch.float32)
    int8_matmul_cuda(_codes(64, 2, seed=56).t(), w, w_scale, None, None, torch.float32)  # column-strided a
    assert calls == ["gemv", "gemv", "tiled", "tiled"]


@pytest.mark.skipif(
    not CUDA or INTERPRET,
    reason="needs a CUDA GPU" if not CUDA else "checks the compiled kernel: unset TRITON_INTERPRET",
)
def test_gpu_realistic_shape(monkeypatch):
    m, k, n = 256, 4096, 4096
    # Exact int32 part (fp32 rounds |Σ| > 2^24 identically on both sides: round-to-nearest-even).
    a, w = _codes(m, k, seed=21), _codes(n, k, seed=22)
    ones = torch.ones(n, device="cuda")
    assert torch.equal(int8_matmul_triton(a, w, ones), int8_matmul_reference(a, w, ones))
    assert torch.equal(int8_gemv_triton(a[:4], w, ones), int8_matmul_reference(a[:4], w, ones))
    for out_dtype in (torch.float32, torch.bfloat16):
        for a_scale in (False, True):
            args = _operands(m, k, n, a_scale=a_scale, bias=True, bias_dtype=out_dtype, seed=23)
            tol = FP32_TOL if out_dtype == torch.float32 else LOW_TOL[out_dtype]
            y = int8_matmul_triton(*args, out_dtype=out_dtype)
            torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=out_dtype), **tol)
    # Decode-sized M, and the dispatcher taking the kernel for CUDA tensors.
    def must_not_run(*args, **kwargs):
        raise AssertionError("int8_matmul dispatched CUDA tensors to the reference")

    for m_small in (1, 3, 7, 33):
        args = _operands(m_small, k, n, a_scale=True, bias=True, bias_dtype=torch.bfloat16, seed=m_small)
        expected = int8_matmul_reference(*args, out_dtype=torch.bfloat16)
        with monkeypatch.context() as mp:
            mp.setattr(mod, "int8_matmul_reference", must_not_run)
            y = int8_matmul(*args, out_dtype=torch.bfloat16)
        torch.testing.assert_close(y, expected, **LOW_TOL[torch.bfloat16])


# ----------------------------------------------------------------------------------------------------
# The persistent TMA kernel (prefill-sized M on Hopper) and the CUDA dispatch
# ----------------------------------------------------------------------------------------------------

TMA_SHAPES = [(1, 32, 16), (37, 96, 48), (64, 128, 40), (300, 64, 24)]  # K % 16 == 0, N·2 bytes % 16 == 0


@pytest.mark.parametrize("has_a_scale", [False, True], ids=["static", "dynamic"])  # static + bf16: warp-specialized
@pytest.mark.parametrize("has_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m,k,n", TMA_SHAPES, ids=[f"M{m}-K{k}-N{n}" for m, k, n in TMA_SHAPES])
def test_tma_kernel_matches_reference(m, k, n, has_bias, has_a_scale):
    if CUDA and torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm90+")
    args = _operands(m, k, n, a_scale=has_a_scale, bias=has_bias, seed=5 * m + n)
    y = mod.int8_matmul_tma(*args, out_dtype=torch.float32)
    torch.testing.assert_close(y, int8_matmul_reference(*args, out_dtype=torch.float32), **FP32_TOL)
    y16 = mod.int8_matmul_tma(*args, out_dtype=torch.bfloat16)
    torch.testing.assert_close(y16, int8_matmul_reference(*args, out_dtype=torch.bfloat16), **LOW_TOL[torch.bfloat16])


@pytest.mark.parametrize("m,n,ws_tile,plain_tile", [
    (2048, 4096, (128, 256), (256, 128)), (4096, 1024, (128, 256), (256, 128)),
    (2048, 1024, (128, 128), (128, 128)), (1024, 1024, (64, 128), (64, 128)),
    (1024, 14336, (128, 128), (128, 128)), (1024, 6144, (128, 128), (128, 128)), (1024, 4096, (128, 256), (256, 128)),
])
def test_tma_tile_narrows_where_the_last_round_of_tiles_is_part_full(m, n, ws_tile, plain_tile):
    """On 132 SMs: a narrower tile serves where the default one fills its last round of tiles below 90 %."""
    meta = mod._tma_meta(m, n, True, 132)
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["WARP_SPECIALIZE"]) == (*ws_tile, True)
    meta = mod._tma_meta(m, n, False, 132)
    assert (meta["BLOCK_M"], meta["BLOCK_N"], meta["WARP_SPECIALIZE"]) == (*plain_tile, False)


@pytest.mark.skipif(not CUDA, reason="real-size tiles: GPU only (too slow for the interpreter)")
@pytest.mark.parametrize("has_a_scale", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("m,k,n", [(2048, 256, 4096), (2048, 256, 1024), (1024, 256, 1024)])
def test_tma_kernel_matches_reference_with_every_tile_kind(m, k, n, has_a_scale):
    """The default, narrow and narrowest persistent tiles (warp-specialized or not) at the sizes that pick them."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("TMA descriptors need sm90+")
    args = _operands(m, k, n, a_scale=has_a_scale, bias=False, seed=m + n)
    y16 = mod.int8_matmul_tma(*args, out_dtype=torch.bfloat16)
    torch.testing.assert_close(y16, int8_matmul_reference(*args, out_dtype=torch.bfloat16), **LOW_TOL[torch.bfloat16])


def test_tma_refuses_unaligned_operands():
    a, w, w_scale, _, _ = _operands(4, 40, 24, a_scale=False, bias=False)  # K = 40: rows not 16-byte aligned
    assert not mod.tma_supported(a, w, torch.float32)
    with pytest.raises(ValueError, match="int8_matmul_tma needs"):
        mod.int8_matmul_tma(a, w, w_scale)


def test_tma_needs_a_triton_with_warp_specialized_loops(monkeypatch):
    a, w, _, _, _ = _operands(4, 64, 24, a_scale=False, bias=False)
    assert mod.tma_supported(a, w, torch.float32)
    monkeypatch.setattr(mod, "_range_warp_specializes", lambda: False)  # an older triton: the tiled kernel serves
    assert not mod.tma_supported(a, w, torch.float32)


@pytest.mark.parametrize("table", ["_TILED_PRETUNED", "_TILED_PRETUNED_NARROW", "_TMA_PRETUNED"])
def test_pretuned_configs_cover_every_m(table):
    configs = getattr(mod, table)
    for m in (1, 7, 16, 17, 64, 100, 300, 1024, 5000, 100_000):
        meta = mod._pretuned_meta(configs, m)
        assert {"BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"} <= set(meta)
        assert meta["BLOCK_M"] <= max(16, mod._bucket(m)) or table == "_TMA_PRETUNED"
