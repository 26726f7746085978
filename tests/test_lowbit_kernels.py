"""Packed low-bit storage and the fused weight-only kernels against their pure-PyTorch specification.

Without a GPU the Triton kernels run under the interpreter on CPU tensors (TRITON_INTERPRET=1, set below
before triton is imported; the kernels are jitted lazily, so import order does not matter). With a GPU the
same tests run the compiled kernels, and `test_gpu_real_shapes` adds Llama-sized layers and a CUDA-graph replay.

Tolerances (‖y − ref‖ / ‖ref‖ on fp32 references, inputs drawn fresh per case):
- fp32 x: 2e-6 — both kernels dequantize exactly ((q − z)·s in fp32) and accumulate in fp32; only the
  summation order differs.
- fp16 / bf16 x, GEMV: within one output ulp elementwise (the weight stays fp32 inside the kernel; under the
  interpreter fp32→bf16 casts truncate, hence a full ulp).
- fp16 / bf16 x, tensor-core kernel: 4e-3 (fp16) / 1.5e-2 (bf16) — the dequantized weight tile is rounded
  to the activation dtype for the MMA, which `F.linear` on a dequantized bf16 weight does as well.
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"

from hf_outliertune.kernels.packing import (  # noqa: E402
    PACKING_FORMAT_VERSION,
    dequantize_packed,
    pack_codes,
    unpack_codes,
    words_per_row,
)

lm = importlib.import_module("hf_outliertune.kernels.lowbit_matmul")
HAVE_TRITON = lm.triton is not None
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed: the kernels cannot run here")

DEVICE = "cuda" if CUDA else "cpu"
BITS = (2, 3, 4, 8)
FP32_TOL = 2e-6
MMA_TOL = {torch.float16: 4e-3, torch.bfloat16: 1.5e-2}
HALF_GEMV_TOL = 6e-3  # bf16 x through the GEMV's fp16-pair sums, bf16 output (its rounding alone is ~3e-3)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layer(n: int, k: int, bits: int, group: int, layout: str, seed: int):
    """Random codes packed, with fp16 scales and fp16 zero points in `layout`: integer-valued, as min-max grids
    give them, for even seeds, fractional, as the refit gives them, for odd seeds."""
    g = _gen(seed)
    codes = torch.randint(0, 2**bits, (n, k), generator=g)
    shape = (n, -(-k // group)) if layout == "oc" else (-(-n // group), k)
    scale = (torch.rand(shape, generator=g) * 0.05 + 1e-3).half()
    zero = torch.randint(0, 2**bits, shape, generator=g).float()
    if seed % 2:
        zero = zero * torch.rand(shape, generator=g)
    zero = zero.half()
    return codes, pack_codes(codes, bits).to(DEVICE), scale.to(DEVICE), zero.to(DEVICE)


def _x(m: int, k: int, dtype: torch.dtype, seed: int, contiguous: bool = True) -> torch.Tensor:
    x = torch.randn(m, 2 * k, generator=_gen(seed + 100)).to(DEVICE, dtype)
    return x[:, ::2] if not contiguous else x[:, :k].contiguous()


def _rel(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return ((got - ref).norm() / ref.norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [1, 31, 32, 33, 100, 576])
def test_pack_roundtrip(bits, k):
    codes = torch.randint(0, 2**bits, (7, k), generator=_gen(bits * 1000 + k))
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.int32 and packed.shape == (7, words_per_row(bits, k)) == (7, bits * -(-k // 32))
    back = unpack_codes(packed, bits, k)
    assert back.dtype == torch.uint8 and torch.equal(back.long(), codes)


def test_pack_layout_is_the_documented_one():
    assert PACKING_FORMAT_VERSION == 1
    q = torch.arange(32) % 16
    assert pack_codes(q[None], 4)[0, 0].item() == 0x76543210  # value j of word 0 at bits 4j, little end first
    assert pack_codes(torch.tensor([[1, 2, 3] + [0] * 29]), 2)[0].tolist() == [1 | 2 << 2 | 3 << 4, 0]
    assert pack_codes(torch.tensor([[255, 1, 0, 0, 7]]), 8)[0, :2].tolist() == [255 | 1 << 8, 7]
    # 3 bits: ceil(K/32) words of bit 0 (value k at bit k % 32), then 2·ceil(K/32) words of q >> 1 as 2-bit codes
    q3 = torch.zeros(1, 40, dtype=torch.long)
    q3[0, 0], q3[0, 33], q3[0, 17] = 5, 6, 3
    p = pack_codes(q3, 3)[0].tolist()
    assert p[:2] == [1 | 1 << 17, 0] and p[2:] == [2, 1 << 2, 3 << 2, 0]
    assert pack_codes(torch.full((1, 32), 7), 3)[0, 0].item() == -1  # all 32 bits set: int32 wraps


def test_pack_rejects_bad_codes():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 7\]"):
        pack_codes(torch.tensor([[8]]), 3)
    with pytest.raises(ValueError, match="codes must lie"):
        pack_codes(torch.tensor([[-1]]), 4)
    with pytest.raises(TypeError, match="integer tensor"):
        pack_codes(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="bits=5 is not supported"):
        pack_codes(torch.zeros(2, 3, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="pass the in_features"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 4, 64)


@pytest.mark.parametrize("layout", ["oc", "ic"])
def test_dequantize_ragged_last_group(layout):
    n, k, g = 40, 100, 32  # 100 = 3·32 + 4 and 40 = 32 + 8: the last group is ragged either way
    codes, packed, scale, zero = _layer(n, k, 3, g, layout, seed=1)
    w = dequantize_packed(packed.cpu(), scale.cpu(), zero.cpu(), 3, g, layout, k)
    for n_i, k_i in [(0, 0), (5, 99), (39, 97), (33, 64), (39, 3)]:
        gi = (n_i, k_i // g) if layout == "oc" else (n_i // g, k_i)
        want = (codes[n_i, k_i] - zero[gi].float().cpu()) * scale[gi].float().cpu()
        assert w[n_i, k_i].item() == pytest.approx(want.item(), rel=1e-6, abs=0)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(group_size=48), ValueError, "power of two in \\[16, 1024\\]"),
        (dict(group_size=8), ValueError, "group_size=8 is invalid"),
        (dict(group_dim="row"), ValueError, "group_dim='row' is invalid"),
        (dict(scale_shape=(64, 3)), ValueError, r"scale has shape \(64, 3\).*needs \(64, 4\)"),
        (dict(scale_dtype=torch.float32), TypeError, "scale must be a float16 tensor"),
    ],
)
def test_group_param_errors(kwargs, err, match):
    n, k = 64, 128
    packed = torch.zeros(n, words_per_row(4, k), dtype=torch.int32)
    gs, gd = kwargs.get("group_size", 32), kwargs.get("group_dim", "oc")
    shape = kwargs.get("scale_shape", (n, 4))
    scale = torch.ones(shape, dtype=kwargs.get("scale_dtype", torch.float16))
    with pytest.raises(err, match=match):
        dequantize_packed(packed, scale, torch.zeros(n, 4, dtype=torch.float16), 4, gs, gd, k)


def test_group_size_may_be_the_whole_dimension():
    # 576 = one group per row: not a power of two, accepted because it spans the grouped dimension.
    codes, packed, scale, zero = _layer(8, 576, 4, 576, "oc", seed=2)
    w = dequantize_packed(packed.cpu(), scale.cpu(), zero.cpu(), 4, 576, "oc", 576)
    assert torch.equal(w, (codes.float() - zero.float().cpu()) * scale.float().cpu())


# ---------------------------------------------------------------------------------------------------------
# Reference
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["oc", "ic"])
def test_reference_is_x_times_dequantized_weight(layout):
    codes, packed, scale, zero = _layer(24, 80, 4, 16, layout, seed=3)
    x = torch.randn(3, 80, generator=_gen(4), dtype=torch.float64).to(DEVICE)
    bias = torch.randn(24, generator=_gen(5)).to(DEVICE)
    w = dequantize_packed(packed, scale, zero, 4, 16, layout, 80)
    y = lm.lowbit_matmul_reference(x, packed, scale, zero, 4, 16, layout, bias)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, x @ w.double().t() + bias.double(), rtol=1e-12, atol=1e-12)


def test_reference_is_differentiable_in_x():
    _, packed, scale, zero = _layer(12, 64, 3, 32, "ic", seed=6)
    x = torch.randn(2, 64, generator=_gen(7)).to(DEVICE).requires_grad_(True)
    y = lm.lowbit_matmul_reference(x, packed, scale, zero, 3, 32, "ic")
    (y * torch.arange(12.0, device=DEVICE)).sum().backward()
    w = dequantize_packed(packed, scale, zero, 3, 32, "ic", 64)
    torch.testing.assert_close(x.grad, torch.arange(12.0, device=DEVICE)[None].expand(2, 12) @ w)


def test_bad_call_errors():
    _, packed, scale, zero = _layer(16, 64, 4, 32, "oc", seed=8)
    x = torch.randn(2, 64).to(DEVICE)
    with pytest.raises(TypeError, match="x must be a 2-D floating tensor"):
        lm.lowbit_matmul(x[None], packed, scale, zero, 4, 32, "oc")
    with pytest.raises(TypeError, match="x must be a 2-D floating tensor"):
        lm.lowbit_matmul(x.to(torch.int32), packed, scale, zero, 4, 32, "oc")
    with pytest.raises(ValueError, match="take bits·ceil"):
        lm.lowbit_matmul(torch.randn(2, 96).to(DEVICE), packed, scale, zero, 4, 32, "oc")
    with pytest.raises(ValueError, match=r"bias must be a floating tensor of shape \(N,\) = \(16,\)"):
        lm.lowbit_matmul(x, packed, scale, zero, 4, 32, "oc", torch.zeros(15).to(DEVICE))
    with pytest.raises(ValueError, match="bits=6 is not supported"):
        lm.lowbit_matmul(x, packed, scale, zero, 6, 32, "oc")


# ---------------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU, compiled on a GPU)
# ---------------------------------------------------------------------------------------------------------

# Small odd shapes: K and N not multiples of the tiles (the interpreter tiles are 4 rows × 4 chunks for the
# GEMV, 16×16×64 for the tensor-core kernel), ragged last groups, a group smaller than the K step (g=16).
GEMV_CASES = [  # (K, N, group) per layout
    (100, 42, 32),
    (256, 24, 64),  # K = 2 whole GEMV steps of 128 codes: the unmasked (EVEN_K) path
]
MMA_CASES = [(200, 33, 64), (128, 40, 16)]  # K = 2 whole 64-code steps in the second


@needs_triton
@pytest.mark.parametrize("layout", ["oc", "ic"])
@pytest.mark.parametrize("bits", BITS)
def test_gemv_matches_reference(bits, layout):
    for i, (k, n, g) in enumerate(GEMV_CASES):
        if layout == "oc" and not lm.gemv_supported(torch.empty(1, k), bits, g, layout):
            g = 64
        _, packed, scale, zero = _layer(n, k, bits, g, layout, seed=10 * bits + i)
        x = _x(1, k, torch.float32, seed=i, contiguous=i == 0)
        bias = torch.randn(n, generator=_gen(i)).to(DEVICE) if i == 0 else None
        y = lm.lowbit_gemv_triton(x, packed, scale, zero, bits, g, layout, bias)
        ref = lm.lowbit_matmul_reference(x, packed, scale, zero, bits, g, layout, bias)
        assert y.shape == (1, n) and y.dtype == torch.float32
        assert _rel(ref, y) < FP32_TOL, (k, n, g)


@needs_triton
@pytest.mark.parametrize("layout", ["oc", "ic"])
@pytest.mark.parametrize("bits", BITS)
def test_mma_matches_reference(bits, layout):
    for i, (k, n, g) in enumerate(MMA_CASES):
        m = (3, 1)[i]
        _, packed, scale, zero = _layer(n, k, bits, g, layout, seed=20 * bits + i)
        x = _x(m, k, torch.float32, seed=i, contiguous=i == 1)
        bias = torch.randn(n, generator=_gen(i)).to(DEVICE) if i == 1 else None
        y = lm.lowbit_mma_triton(x, packed, scale, zero, bits, g, layout, bias)
        ref = lm.lowbit_matmul_reference(x, packed, scale, zero, bits, g, layout, bias)
        assert y.shape == (m, n) and y.dtype == torch.float32
        assert _rel(ref, y) < FP32_TOL, (m, k, n, g)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("layout", ["oc", "ic"])
def test_half_precision_activations(dtype, layout):
    # The GEMV rounds once, to the output dtype, within one ulp of the fp32 reference; with HALF (the default
    # for bf16 x) products are summed in fp16 pairs first, which adds about 1e-3 relative error. fp16 x ignores
    # HALF (its output ulp is 8x finer than bf16's), so both configs give identical results.
    k, n, g = 160, 36, 32
    _, packed, scale, zero = _layer(n, k, 4, g, layout, seed=30)
    bias = torch.randn(n, generator=_gen(31)).to(DEVICE, dtype)
    ref32 = lambda x: lm.lowbit_matmul_reference(x.float(), packed, scale, zero, 4, g, layout, bias.float())  # noqa: E731
    x1 = _x(1, k, dtype, seed=32)
    cfg = {"BLOCK_N": 4, "NCHUNK": 2, "UNITS": 1, "PREFETCH": False, "num_warps": 1, "num_stages": 1}
    exact = lm.lowbit_gemv_triton(x1, packed, scale, zero, 4, g, layout, bias, config={**cfg, "HALF": False})
    half = lm.lowbit_gemv_triton(x1, packed, scale, zero, 4, g, layout, bias, config={**cfg, "HALF": True})
    default = lm.lowbit_gemv_triton(x1, packed, scale, zero, 4, g, layout, bias)
    assert exact.dtype == half.dtype == default.dtype == dtype
    ref = ref32(x1)
    ulp = torch.finfo(dtype).eps * ref.abs().clamp_min(torch.finfo(dtype).tiny)
    assert ((exact.float() - ref).abs() <= ulp + 1e-6 * ref.abs().max()).all()
    if dtype == torch.float16:
        assert torch.equal(half, exact)
    else:
        assert _rel(ref, half) < HALF_GEMV_TOL and _rel(ref, default) < HALF_GEMV_TOL
        assert ((half.float() - ref).abs() <= 2 * ulp + 2e-3 * ref.abs().max()).all()
    x5 = _x(5, k, dtype, seed=33)
    y = lm.lowbit_mma_triton(x5, packed, scale, zero, 4, g, layout, bias)
    assert y.dtype == dtype and _rel(ref32(x5), y) < MMA_TOL[dtype]


@needs_triton
@pytest.mark.parametrize("half", [False, True], ids=["fp32-sums", "fp16-pair-sums"])
@pytest.mark.parametrize("prefetch", [False, True], ids=["inline-loads", "prefetch"])
@pytest.mark.parametrize("wide", [False, True], ids=["min-units", "double-units"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gemv_variants_and_whole_row_group(bits, wide, prefetch, half):
    # The GEMV's launch variants (units a chunk; loads issued a step ahead or not) on a single group spanning K
    # (192, not a power of two) and a ragged K tail (192 is not a multiple of the step).
    k, n = 192, 20
    _, packed, scale, zero = _layer(n, k, bits, k, "oc", seed=40 + bits)
    # HALF runs with bf16 x (fp32 x ignores it).
    x = _x(1, k, torch.bfloat16 if half else torch.float32, seed=41)
    ref = lm.lowbit_matmul_reference(x.float(), packed, scale, zero, bits, k, "oc")
    units = lm.gemv_min_units(bits) * (2 if wide else 1)
    cfg = {"BLOCK_N": 4, "NCHUNK": 2, "UNITS": units, "PREFETCH": prefetch, "HALF": half, "num_warps": 1,
           "num_stages": 1}
    y = lm.lowbit_gemv_triton(x, packed, scale, zero, bits, k, "oc", config=cfg)
    assert _rel(ref, y) < (HALF_GEMV_TOL if half else FP32_TOL)


@needs_triton
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout, group", [("oc", 16), ("oc", 200), ("ic", 16)])
def test_dequant_kernel_is_exact(bits, layout, group):
    """The prefill path's first half, the dense weight (ragged K, small and whole-row groups): bit-exact in fp32
    with integer zero points; with fractional ones (refitted grids) (2^b + z)·s rounds once, so within 1e-6."""
    for seed in (70, 71):
        _, packed, scale, zero = _layer(40, 200, bits, group, layout, seed=seed + 2 * bits)
        w = lm.lowbit_dequant_triton(packed, scale, zero, bits, group, layout, 200, torch.float32)
        want = dequantize_packed(packed, scale, zero, bits, group, layout, 200)
        if seed % 2:
            torch.testing.assert_close(w, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        else:
            assert torch.equal(w, want)


@needs_triton
def test_dispatch_by_m_and_group_layout():
    k, n = 96, 16
    x1 = _x(1, k, torch.float32, seed=50)
    _, packed, scale, zero = _layer(n, k, 3, 16, "oc", seed=51)
    assert lm.gemv_supported(x1, 4, 32, "oc") and not lm.gemv_supported(x1, 3, 16, "oc")  # 3-bit chunks: 32
    assert lm.gemv_supported(x1, 8, 8, "oc") and not lm.gemv_supported(x1, 8, 4, "oc")  # x vectors: 8 codes
    assert lm.gemv_supported(x1, 3, 16, "ic") and lm.gemv_supported(x1, 3, 96, "oc")
    with pytest.raises(ValueError, match="use lowbit_mma_triton"):
        lm.lowbit_gemv_triton(x1, packed, scale, zero, 3, 16, "oc")
    # The dispatcher sends this M=1 call to the tensor-core kernel instead, with the same result.
    ref = lm.lowbit_matmul_reference(x1, packed, scale, zero, 3, 16, "oc")
    assert _rel(ref, lm.lowbit_matmul_triton(x1, packed, scale, zero, 3, 16, "oc")) < FP32_TOL
    y = lm.lowbit_matmul(x1, packed, scale, zero, 3, 16, "oc")
    if CUDA:
        assert _rel(ref, y) < FP32_TOL
    else:  # CPU tensors always take the reference
        assert torch.equal(y, ref)


@needs_triton
@pytest.mark.parametrize("bits", [3, 4])
def test_half_gemv_keeps_large_activations_finite(bits):
    # The fp16-pair sums hold |x| up to 32752 (codes scaled to v/16, at most 16 products a lane): an outlier
    # channel of 30000 in a bf16 row must not overflow.
    k, n, g = 256, 16, 64
    _, packed, scale, zero = _layer(n, k, bits, g, "oc", seed=70 + bits)
    x = _x(1, k, torch.bfloat16, seed=71)
    x[0, 5] = 30000.0
    cfg = {"BLOCK_N": 4, "NCHUNK": 2, "UNITS": lm.gemv_min_units(bits), "PREFETCH": False, "HALF": True,
           "num_warps": 1, "num_stages": 1}
    y = lm.lowbit_gemv_triton(x, packed, scale, zero, bits, g, "oc", config=cfg)
    ref = lm.lowbit_matmul_reference(x.float(), packed, scale, zero, bits, g, "oc")
    assert torch.isfinite(y).all() and _rel(ref, y) < HALF_GEMV_TOL


@needs_triton
@pytest.mark.parametrize("layout", ["oc", "ic"])
def test_gemv_serves_a_few_rows(layout):
    # Decode with a small batch: the GEMV takes up to GEMV_MAX_M rows (one program column each, strided x),
    # the tensor-core kernel the rest; both match the reference.
    k, n, g = 128, 32, 32
    _, packed, scale, zero = _layer(n, k, 4, g, layout, seed=60)
    top = lm.GEMV_MAX_M[layout]
    for m in (top, top + 1):
        x = _x(m, k, torch.float32, seed=61 + m, contiguous=False)
        assert lm.uses_gemv(x, 4, g, layout) == (m == top)
        ref = lm.lowbit_matmul_reference(x, packed, scale, zero, 4, g, layout)
        assert _rel(ref, lm.lowbit_matmul_triton(x, packed, scale, zero, 4, g, layout)) < FP32_TOL
    assert _rel(ref, lm.lowbit_gemv_triton(x, packed, scale, zero, 4, g, layout)) < FP32_TOL


@needs_triton
def test_tuned_tiles_are_keyed_by_group_size():
    # A per-IC tile must not be wider than a group: a tile tuned for g=128 (BLOCK_N 128) must not be reused
    # for g=64 on the same shape. Both the cached launch key and triton's autotune key carry the group size.
    x = torch.empty(256, 64, device=DEVICE)
    keys = []
    for g in (128, 64):
        _, packed, scale, zero = _layer(256, 64, 4, g, "ic", seed=g)
        keys.append(lm._plan(x, packed, scale, zero, 4, g, "ic", None, "mma").tune_key)
    assert keys[0] != keys[1]
    assert "GROUP" in lm._kernels(lm._interpret_mode())["mma"].keys


@needs_triton
def test_custom_op_fake_and_autograd():
    k, n = 64, 16
    _, packed, scale, zero = _layer(n, k, 4, 32, "ic", seed=60)
    bias = torch.randn(n, generator=_gen(61)).to(DEVICE)
    x = _x(2, k, torch.float32, seed=62)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        out = torch.ops.hf_outliertune.lowbit_matmul(fx, mode.from_tensor(packed), mode.from_tensor(scale),
                                                     mode.from_tensor(zero), 4, 32, "ic", mode.from_tensor(bias))
        assert out.shape == (2, n) and out.dtype == torch.float32
    x.requires_grad_(True)
    bias.requires_grad_(True)
    y = torch.ops.hf_outliertune.lowbit_matmul(x, packed, scale, zero, 4, 32, "ic", bias)
    y.square().sum().backward()
    w = dequantize_packed(packed, scale, zero, 4, 32, "ic", k)
    torch.testing.assert_close(x.grad, 2 * y.detach() @ w, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, 2 * y.detach().sum(0), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# GPU: real shapes, the dispatcher, and CUDA-graph capture of the custom op
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("layout", ["oc", "ic"])
@pytest.mark.parametrize("bits", [3, 4])
def test_gpu_real_shapes(bits, layout):
    k, n, g = 4096, 6144, 128
    codes = torch.randint(0, 2**bits, (n, k), device="cuda")
    packed = pack_codes(codes, bits)
    shape = (n, k // g) if layout == "oc" else (n // g, k)
    scale = (torch.rand(shape, device="cuda") * 1e-2 + 1e-4).half()
    zero = torch.randint(0, 2**bits, shape, device="cuda").half()
    for m in (1, 16, 300):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        ref = lm.lowbit_matmul_reference(x.float(), packed, scale, zero, bits, g, layout)
        y = lm.lowbit_matmul(x, packed, scale, zero, bits, g, layout)
        assert _rel(ref, y) < MMA_TOL[torch.bfloat16], m
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    lm.lowbit_matmul(x, packed, scale, zero, bits, g, layout)  # warm-up: autotuning runs outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = lm.lowbit_matmul(x, packed, scale, zero, bits, g, layout)
    x.copy_(torch.randn(1, k, device="cuda", dtype=torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    ref = lm.lowbit_matmul_reference(x.float(), packed, scale, zero, bits, g, layout)
    assert _rel(ref, y) < MMA_TOL[torch.bfloat16]
