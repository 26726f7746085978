"""Per-layer W8A8 GEMM speed at Llama-3-8B shapes against bf16 cuBLAS and the peers, in one run (GPU).

Rows per (K×N, M): bf16 `F.linear` (cuBLAS); ours = the int8 GEMM with the fused epilogue (per-token scale,
per-channel weight scale, bf16 out), the kernel the module dispatches to (the DP4A GEMV up to 2 rows, tensor-core
tiles above, warp-specialized persistent tiles from M = 1024); ours_static = the same without the per-token scale
(the static OutlierTune path of q/k/v/gate/up); ours_gemv = the GEMV forced (M ≤ 16); ours+quant = the dynamic per-token
quantization kernel (with the in-kernel Hadamard rotation the o/down projections use) plus that GEMM;
`torch._int_mm` (cuBLASLt int8, K-major weight, int32 out, no epilogue, M > 16 only); fp8 rowwise
`torch._scaled_mm` (pre-quantized inputs, bf16 out). Timing: CUDA-graph replay over weight copies that defeat
L2 (primary; three round-robin rounds, median kept) and `triton.testing.do_bench` eager with L2 flush.

    python bench/gemm_int8.py --json docs/gemm_int8_h100.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "--autotune" in sys.argv:  # before the kernels are imported: search every config per shape
    os.environ["HF_OUTLIERTUNE_AUTOTUNE"] = "1"

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copies_to_defeat_l2, eager_time_us, env_info, graph_time_us  # noqa: E402

import importlib  # noqa: E402

int8_matmul_module = importlib.import_module("hf_outliertune.kernels.int8_matmul")
from hf_outliertune.kernels.act_quant import norm_quant_triton, per_token_quant_triton  # noqa: E402
from hf_outliertune.kernels.int8_matmul import (  # noqa: E402
    int8_gemv_triton,
    int8_matmul_cuda,
    int8_matmul_tma,
    int8_matmul_triton,
)
from hf_outliertune.rotation import hadamard_block_size  # noqa: E402

COLUMNS = ("ours", "ours_static", "ours+quant", "ours_gemv", "ours_tiled", "ours_tma", "_int_mm", "fp8_rowwise")
SHAPES = [(4096, 6144), (4096, 4096), (4096, 14336), (14336, 4096), (4096, 1024)]  # (K, N): fused qkv, o, gate/up, down, k/v
MS = [1, 16, 64, 256, 1024, 2048, 8192]


def bench_shape(k: int, n: int, m: int, eager: bool, rounds: int = 3, settle_s: float = 0.3) -> dict:
    """Every variant at one shape, in `rounds` round-robin rounds of graph timings (median kept, all recorded), each
    after `settle_s` idle seconds. The H100 lowers its clock at its 700 W cap (seen in nvidia-smi during int8 tiles), and
    without the pause a kernel timed right after cuBLAS bf16 ran up to 15 % slower than the same kernel timed later."""
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    copies = copies_to_defeat_l2(n * k)  # sized on int8 weight bytes; bf16 copies are twice as large
    w16 = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    w8 = [torch.randint(-127, 128, (n, k), device=dev, dtype=torch.int8) for _ in range(copies)]
    w_scale = torch.rand(n, device=dev) * 1e-3
    codes, a_scale = per_token_quant_triton(x, 8)
    block = hadamard_block_size(k)
    variants = {
        "bf16": [lambda w=w: F.linear(x, w) for w in w16],
        "ours": [lambda w=w: int8_matmul_cuda(codes, w, w_scale, a_scale, None, torch.bfloat16) for w in w8],
        # static activations (OutlierTune's folded q/k/v/gate/up): no per-token scale, warp-specialized TMA from M = 1024
        "ours_static": [lambda w=w: int8_matmul_cuda(codes, w, w_scale, None, None, torch.bfloat16) for w in w8],
        "ours+quant": [lambda w=w: _quant_then_gemm(x, block, w, w_scale) for w in w8],
        "ours_tiled": [lambda w=w: int8_matmul_triton(codes, w, w_scale, a_scale, None, torch.bfloat16) for w in w8],
    }
    if m <= 16:
        variants["ours_gemv"] = [lambda w=w: int8_gemv_triton(codes, w, w_scale, a_scale, None, torch.bfloat16)
                                 for w in w8]
    if m >= 64:
        variants["ours_tma"] = [lambda w=w: int8_matmul_tma(codes, w, w_scale, a_scale, None, torch.bfloat16)
                                for w in w8]
    if m > 16:
        variants["_int_mm"] = [lambda w=w: torch._int_mm(codes, w.t()) for w in w8]
    f8 = [w.to(torch.float8_e4m3fn) for w in w16[:copies]]
    x8 = x.to(torch.float8_e4m3fn)
    sa = torch.ones(m, 1, device=dev)
    sb = torch.ones(1, n, device=dev)
    variants["fp8_rowwise"] = [
        lambda w=w: torch._scaled_mm(x8, w.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16) for w in f8
    ]
    row = {"K": k, "N": n, "M": m, "copies": copies, "graph_us": {}, "graph_us_rounds": {}, "eager_us": {}}
    for _ in range(rounds):
        for name, calls in variants.items():
            if name in row.get("errors", {}):
                continue
            try:
                time.sleep(settle_s)
                row["graph_us_rounds"].setdefault(name, []).append(graph_time_us(calls))
                if eager and name not in row["eager_us"]:
                    row["eager_us"][name] = eager_time_us(calls[0])
            except Exception as err:  # a peer that does not support this shape: record why
                row.setdefault("errors", {})[name] = f"{type(err).__name__}: {str(err)[:160]}"
    row["graph_us"] = {name: statistics.median(times) for name, times in row["graph_us_rounds"].items()
                       if name not in row.get("errors", {})}
    base = row["graph_us"]["bf16"]
    row["speedup_vs_bf16"] = {name: base / t for name, t in row["graph_us"].items()}
    row["ours_tops"] = 2 * m * n * k / row["graph_us"]["ours"] / 1e6
    row["ours_weight_GBps"] = n * k / row["graph_us"]["ours"] / 1e3
    return row


GEMV_GRID = [(bn, bk, warps) for bn in (1, 2, 4, 8, 16) for bk in (64, 128, 256, 512) for warps in (2, 4, 8)
             if 4 <= bn * bk // (32 * warps) <= 64]  # 4 to 64 words a thread a step


def sweep_gemv(k: int, n: int, m: int) -> dict:
    """Every GEMV tile in `GEMV_GRID` at one shape (CUDA graph, rotating weights): the data behind `GEMV_CONFIG`."""
    codes, a_scale = per_token_quant_triton(torch.randn(m, k, device="cuda", dtype=torch.bfloat16), 8)
    w8 = [torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8) for _ in range(copies_to_defeat_l2(n * k))]
    w_scale = torch.rand(n, device="cuda") * 1e-3
    times = {}
    for bn, bk, warps in GEMV_GRID:
        cfg = {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
        times[f"{bn}x{bk}w{warps}"] = graph_time_us(
            [lambda w=w: int8_gemv_triton(codes, w, w_scale, a_scale, None, torch.bfloat16, config=cfg) for w in w8])
    best = min(times, key=times.get)
    cfg = int8_matmul_module.GEMV_CONFIG
    default = f"{cfg['BLOCK_N']}x{cfg['BLOCK_K']}w{cfg['num_warps']}"  # one of the grid's tiles: already timed
    print(f"GEMV sweep {k}×{n} M={m}: best {best} {times[best]:.1f} µs; default {default} {times[default]:.1f} µs",
          flush=True)
    return {"K": k, "N": n, "M": m, "us": times, "best": best}


def _quant_then_gemm(x: torch.Tensor, block: int, w: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """The dynamic layer's whole work: rotate + per-token quantize (one kernel), then the fused GEMM."""
    codes, scale = per_token_quant_triton(x, 8, block)
    return int8_matmul_cuda(codes, w, w_scale, scale, None, torch.bfloat16)


def bench_act_quant(ms: list[int]) -> list[dict]:
    """The activation-quantization kernels alone: fused RMSNorm+quant, per-token, per-token with Hadamard."""
    rows = []
    print(f"\n{'K':>6} {'M':>5} | {'norm+quant µs':>13} | {'per-token µs':>12} | {'+Hadamard µs':>12} | GB/s (norm+quant)")
    for k in (4096, 14336):
        block = hadamard_block_size(k)
        w = torch.rand(k, device="cuda") + 0.5
        for m in ms:
            xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies_to_defeat_l2(3 * m * k))]
            t_norm = graph_time_us([lambda x=x: norm_quant_triton(x, w, None, 1e-5, "rms", 0.0, None, 8) for x in xs])
            t_tok = graph_time_us([lambda x=x: per_token_quant_triton(x, 8, 1) for x in xs])
            t_had = graph_time_us([lambda x=x: per_token_quant_triton(x, 8, block) for x in xs])
            rows.append({"K": k, "M": m, "hadamard_block": block, "norm_quant_us": t_norm, "per_token_us": t_tok,
                         "per_token_hadamard_us": t_had})
            print(f"{k:>6} {m:>5} | {t_norm:>13.1f} | {t_tok:>12.1f} | {t_had:>12.1f} | {3 * m * k / t_norm / 1e3:.0f}",
                  flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="gemm_int8.json")
    parser.add_argument("--ms", type=int, nargs="*", default=MS)
    parser.add_argument("--no-eager", action="store_true", help="skip the do_bench (eager) timings")
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds of graph timings (median kept)")
    parser.add_argument("--settle-s", type=float, default=0.3, help="idle seconds before each graph timing")
    parser.add_argument("--autotune", action="store_true", help="search all configs per shape; record the winners")
    parser.add_argument("--sweep-gemv", action="store_true", help="time every GEMV tile at each shape and M ≤ 16 "
                        "of --ms instead of the comparison table")
    args = parser.parse_args()
    rows = []
    t0 = time.time()
    if args.sweep_gemv:
        sweep = [sweep_gemv(k, n, m) for k, n in SHAPES for m in args.ms if m <= 16]
        with open(args.json, "w") as f:
            json.dump({"env": env_info(), "date": time.strftime("%Y-%m-%d"), "gemv_sweep": sweep}, f, indent=1)
        print(f"wrote {args.json} ({time.time() - t0:.0f} s)")
        return
    print(f"{'K×N':>11} {'M':>5} | {'bf16 µs':>8} | " + " | ".join(
        f"{v:>11}" for v in COLUMNS) + "  (speed-up vs bf16, CUDA graph)")
    for k, n in SHAPES:
        for m in args.ms:
            row = bench_shape(k, n, m, eager=not args.no_eager, rounds=args.rounds, settle_s=args.settle_s)
            rows.append(row)
            sp = row["speedup_vs_bf16"]
            cells = " | ".join(f"{sp[v]:>10.2f}x" if v in sp else f"{'-':>11}" for v in COLUMNS)
            print(f"{k:>5}×{n:<5} {m:>5} | {row['graph_us']['bf16']:>8.1f} | {cells}  ({row['ours_tops']:.0f} TOPS)",
                  flush=True)
    quant_rows = bench_act_quant(args.ms)
    out = {"env": env_info(), "date": time.strftime("%Y-%m-%d"), "wall_s": time.time() - t0, "rows": rows,
           "act_quant": quant_rows, "autotune": args.autotune,
           "tuned_configs": [{"key": [str(v) for v in key], "config": {k: v for k, v in meta.items()
                              if isinstance(v, int)}} for key, meta in int8_matmul_module._TUNED_META.items()]}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
