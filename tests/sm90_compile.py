"""Compile every Triton kernel family for an H100 (sm_90) without a GPU, with Triton's bundled ptxas.

The interpreter (TRITON_INTERPRET=1) runs the kernels' semantics on CPU but skips code generation, so errors
that only the compiler sees (a non-constexpr global, a layout the backend cannot lower) would reach a GPU user
first. This script compiles each kernel at representative constexprs and prints one line per case; it runs in
its own process (`tests/test_sm90_compile.py`) because `triton.jit` picks interpreter or compiler mode when it
is applied. Run it directly to see the per-case SASS sizes: `python tests/sm90_compile.py`.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TARGET = GPUTarget("cuda", 90, 32)
# Strides that are 1 for contiguous operands: triton's launcher specializes an integer argument of 1 as a constant.
UNIT_STRIDES = ("stride_xk", "stride_s1", "stride_ak", "stride_wk", "stride_cn", "stride_ws", "stride_as",
                "stride_bias")


def _module(name: str):
    return importlib.import_module(f"hf_outliertune.kernels.{name}")


def _jit_fn(kernel):
    """The JITFunction under any autotune/heuristics wrappers."""
    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        kernel = kernel.fn
    return kernel


def compile_case(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, num_warps: int):
    """Compile `kernel` for sm_90: `pointers` maps pointer params to element types; `floats` names fp32 scalars;
    every other non-constexpr param is an i32. As triton's launcher does for typical arguments, unit strides
    (`UNIT_STRIDES`) are constants and every pointer and other integer is marked 16-divisible, so loads vectorize as they do on the GPU. Returns the SASS instruction count."""
    fn = _jit_fn(kernel)
    constexprs = {**{name: 1 for name in UNIT_STRIDES if name in fn.arg_names}, **constexprs}
    signature, divisible = {}, []
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = f"*{pointers[name]}"
            divisible.append(name)
        else:
            signature[name] = "fp32" if name in floats else "i32"
            if name not in floats and "SHIFT" not in name:
                divisible.append(name)
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    compiled = triton.compile(src, target=TARGET, options={"num_warps": num_warps, "num_stages": 2})
    nvdisasm = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        sass = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    return sum(1 for line in sass.splitlines() if line.strip().startswith("/*") and "*/" in line and ";" in line)


def cases():
    """(label, kernel, pointers, floats, constexprs, num_warps) for every kernel family."""
    lm, im, aq = _module("lowbit_matmul"), _module("int8_matmul"), _module("act_quant")
    low = lm._kernels(False)
    wo_ptrs = {"x_ptr": "bf16", "w_ptr": "i32", "s_ptr": "fp16", "z_ptr": "fp16", "bias_ptr": "bf16", "y_ptr": "bf16"}
    for bits in (2, 3, 4, 8):
        for per_ic in (False, True):
            for half in (False, True):
                units = lm.gemv_min_units(bits) if bits == 3 else 4
                yield (f"gemv W{bits} {'ic' if per_ic else 'oc'}{' half' if half else ''}", low["gemv"], wo_ptrs, (),
                       dict(BITS=bits, PER_IC=per_ic, HAS_BIAS=True, EVEN_K=True, USE_ASM=True, BLOCK_N=4,
                            NCHUNK=64, UNITS=units, PREFETCH=bits == 4, HALF=half), 2)
    for bits in (3, 4):
        for per_ic in (False, True):
            yield (f"mma W{bits} {'ic' if per_ic else 'oc'}", low["mma"], wo_ptrs, (),
                   dict(BITS=bits, PER_IC=per_ic, GROUP_K=0 if per_ic else 64, HAS_BIAS=False, EVEN_K=True,
                        USE_ASM=True, DOT_FP32=False, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=8), 4)
            yield (f"dequant W{bits} {'ic' if per_ic else 'oc'}", low["dequant"],
                   {"w_ptr": "i32", "s_ptr": "fp16", "z_ptr": "fp16", "out_ptr": "bf16"}, (),
                   dict(BITS=bits, PER_IC=per_ic, GROUP_K=0 if per_ic else 64, EVEN_K=True, USE_ASM=True,
                        BLOCK_N=64, BLOCK_K=64), 4)
    i8_ptrs = {"a_ptr": "i8", "w_ptr": "i8", "c_ptr": "bf16", "w_scale_ptr": "fp32", "a_scale_ptr": "fp32",
               "bias_ptr": "bf16"}
    tiled_ptrs = {**i8_ptrs, "partial_ptr": "i32", "arrived_ptr": "i32"}
    for bm, bn, bk, warps, split in ((16, 64, 512, 4, 1), (128, 256, 128, 8, 1), (64, 64, 128, 4, 4)):
        yield (f"int8 tiled {bm}x{bn}x{bk}" + (f" split-K {split}" if split > 1 else ""), im._jitted_kernel(False),
               tiled_ptrs, (), dict(HAS_A_SCALE=True, HAS_BIAS=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                                    SPLIT_K=split), warps)
    for block_n, block_k, warps in ((2, 512, 4), (16, 64, 2)):
        yield (f"int8 GEMV {block_n}x{block_k}", im._jitted_gemv_kernel(False), {**i8_ptrs, "a_ptr": "i32", "w_ptr": "i32"},
               (), dict(HAS_A_SCALE=True, HAS_BIAS=True, USE_ASM=True, EVEN_K=True, BLOCK_N=block_n, BLOCK_K=block_k),
               warps)
    for ws in (False, True):
        yield (f"int8 persistent TMA{' warp-specialized' if ws else ''}", im._jitted_tma_kernel(False), i8_ptrs, (),
               dict(NUM_SMS=132, HAS_A_SCALE=True, HAS_BIAS=False, BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8,
                    WARP_SPECIALIZE=ws), 4)
    yield ("norm+quant", aq._jit("_norm_quant_kernel", False),
           {"x_ptr": "bf16", "w_ptr": "bf16", "b_ptr": "bf16", "off_ptr": "fp32", "out_ptr": "i8"},
           ("eps", "w_offset", "QMAX"), dict(IS_LAYERNORM=False, HAS_BIAS=False, HAS_OFFSET=True, BLOCK_K=4096), 8)
    yield ("static quant", aq._jit("_static_quant_kernel", False), {"x_ptr": "bf16", "off_ptr": "fp32", "out_ptr": "i8"},
           ("QMAX",), dict(HAS_OFFSET=True, BLOCK_K=1024), 4)
    yield ("per-token quant", aq._jit("_per_token_quant_kernel", False),
           {"x_ptr": "bf16", "up_ptr": "bf16", "out_ptr": "i8", "step_ptr": "fp32"}, ("QMAX", "TINY_STEP"),
           dict(BLOCK_K=16384, GATED=False), 8)
    for gated in (False, True):
        yield (f"per-token quant + Hadamard{' of silu(gate)·up' if gated else ''}",
               aq._jit("_hadamard_per_token_quant_kernel", False),
               {"x_ptr": "bf16", "up_ptr": "bf16", "out_ptr": "i8", "step_ptr": "fp32"}, ("QMAX", "TINY_STEP", "NORM"),
               dict(B1=32, B2=64, LOG_B1=5, LOG_B2=6, GATED=gated), 4)
    yield ("Hadamard blocks (split path)", aq._jit("_hadamard_blocks_kernel", False),
           {"x_ptr": "bf16", "up_ptr": "bf16", "y_ptr": "fp32", "amax_ptr": "fp32"}, (),
           dict(B1=64, B2=32, LOG_B1=6, LOG_B2=5, GATED=True), 4)
    yield ("quant blocks (split path)", aq._jit("_quant_blocks_kernel", False),
           {"y_ptr": "fp32", "amax_ptr": "fp32", "out_ptr": "i8", "step_ptr": "fp32"}, ("QMAX", "TINY_STEP", "NORM"),
           dict(BLOCK=2048, NBLOCKS_P2=8), 4)


def main() -> int:
    failures = 0
    for label, kernel, pointers, floats, constexprs, warps in cases():
        try:
            print(f"ok   {label}: {compile_case(kernel, pointers, floats, constexprs, warps)} SASS instructions",
                  flush=True)
        except Exception as exc:  # report every case, then fail
            failures += 1
            print(f"FAIL {label}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET=1: the interpreter skips code generation")
    sys.exit(main())
