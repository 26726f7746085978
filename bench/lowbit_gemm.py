"""Per-layer speed of the fused low-bit weight-only kernels at Llama-3-8B shapes against bf16, in one run (GPU).

Rows per (K×N, M): bf16 `F.linear` (cuBLAS) and `lowbit_matmul` (the dispatch the module uses: the CUDA-core
GEMV for up to 2 (per-OC) or 4 (per-IC) rows, tensor-core tiles above) for W4/W3/W2 at g128/g64 in both group
layouts (per-OC, per-IC).
Timing: CUDA-graph replay over weight copies that defeat L2 (primary) and `triton.testing.do_bench` eager with
its L2 flush (includes the host-side launch path). Reported besides: bytes moved (packed weight + scales/zeros +
activations), the bandwidth that implies and its fraction of the measured device-copy bandwidth, the bf16 →
packed weight-memory ratio, and a linear-layer-only estimate of batch-1 decode tokens/s for Llama-3-8B.

    python bench/lowbit_gemm.py --json docs/lowbit_gemm_h100.json
    python bench/lowbit_gemm.py --check     # kernels vs the reference at these shapes, every path and layout
    python bench/lowbit_gemm.py --sweep     # time every candidate tile at M = 1, 16, 2048 (tuning aid)
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import importlib
import json
import multiprocessing
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import copies_to_defeat_l2, eager_time_us, env_info, graph_time_us  # noqa: E402

from hf_outliertune.kernels.packing import group_params_shape, words_per_row  # noqa: E402

lm = importlib.import_module("hf_outliertune.kernels.lowbit_matmul")  # the package re-exports the function

SHAPES = [(4096, 4096), (4096, 6144), (4096, 14336), (14336, 4096)]  # (K, N): o, fused qkv, gate/up, down
MS = [1, 4, 16, 256, 2048]
VARIANTS = [(4, 128, "oc"), (4, 128, "ic"), (4, 64, "oc"), (4, 64, "ic"),
            (3, 128, "oc"), (3, 128, "ic"), (3, 64, "oc"), (3, 64, "ic"),
            (2, 128, "oc"), (2, 128, "ic")]
LLAMA3_8B = {"layers": 32, "hidden": 4096, "vocab": 128256,
             "per_layer": [(4096, 6144, 1), (4096, 4096, 1), (4096, 14336, 2), (14336, 4096, 1)]}


def quantized_weight(k: int, n: int, bits: int, group: int, layout: str, seed: int = 0):
    """Random packed codes (every bit pattern is a valid code) with fp16 scales and integer zero points."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    packed = torch.randint(-2**31, 2**31, (n, words_per_row(bits, k)), dtype=torch.int32, device="cuda", generator=g)
    shape = group_params_shape(n, k, group, layout)
    scale = (torch.rand(shape, device="cuda", generator=g) * 2e-3 + 1e-4).half()
    zero = torch.randint(0, 2**bits, shape, device="cuda", generator=g).half()
    return packed, scale, zero


def weight_bytes(k: int, n: int, bits: int, group: int, layout: str) -> int:
    rows, cols = group_params_shape(n, k, group, layout)
    return n * words_per_row(bits, k) * 4 + 2 * rows * cols * 2


def copy_bandwidth_gbps() -> float:
    """Device-to-device copy of 1 GiB, counting bytes read plus written (the HBM roofline in practice)."""
    a = torch.empty(2**29, dtype=torch.int16, device="cuda")
    b = torch.empty_like(a)
    ms = __import__("triton").testing.do_bench(lambda: b.copy_(a), warmup=20, rep=200, return_mode="median")
    return 2 * a.numel() * 2 / ms / 1e6


# ---------------------------------------------------------------------------------------------------------
# Parallel compilation: every candidate tile of every case into triton's on-disk cache, before autotuning.
# ---------------------------------------------------------------------------------------------------------


def _compile_task(task: tuple) -> int:
    k, n, m, bits, group, layout, kernel, configs, has_bias = task
    packed, scale, zero = quantized_weight(k, n, bits, group, layout)
    x = torch.empty((m, k), dtype=torch.bfloat16, device="cuda")
    bias = torch.empty(n, dtype=torch.bfloat16, device="cuda") if has_bias else None
    if kernel is None:
        kernel = "gemv" if lm.uses_gemv(x, bits, group, layout) else "mma"
    return lm.compile_candidates(x, packed, scale, zero, bits, group, layout, bias, kernel=kernel, configs=configs)


def parallel_compile(tasks: list[tuple], workers: int) -> int:
    """Tasks (K, N, M, bits, group, layout, kernel or None = dispatch, configs or None = candidates, bias?)."""
    ctx = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        return sum(pool.map(_compile_task, tasks))


def precompile(cases: list[tuple], workers: int) -> int:
    """Every autotune candidate of the benchmark's calls, one task per set of distinct compiled variants:
    the GEMV's code depends on K (whole steps or a masked tail), the tensor-core kernel's on the M class
    (decode or prefill tiles) and, per-OC, on the group size."""
    seen, tasks = set(), []
    for k, n, m, bits, group, layout in cases:
        kernel = "gemv" if m <= lm.GEMV_MAX_M[layout] else "mma"
        sig = (kernel, bits, layout, k) if kernel == "gemv" else (kernel, m <= 16, bits, layout, group)
        if sig not in seen:
            seen.add(sig)
            tasks.append((k, n, m, bits, group, layout, None, None, False))
    return parallel_compile(tasks, workers)


# ---------------------------------------------------------------------------------------------------------
# Benchmark
# ---------------------------------------------------------------------------------------------------------


def bench_case(k: int, n: int, m: int, eager: bool, copy_gbps: float, bf16_cache: dict) -> list[dict]:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    if (k, n, m) not in bf16_cache:
        copies = copies_to_defeat_l2(n * k * 2)
        w16 = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        calls = [lambda w=w: F.linear(x, w) for w in w16]
        bf16_cache[(k, n, m)] = (graph_time_us(calls), eager_time_us(calls[0]) if eager else None)
        del w16, calls
    bf16_graph, bf16_eager = bf16_cache[(k, n, m)]
    rows = []
    for bits, group, layout in VARIANTS:
        wbytes = weight_bytes(k, n, bits, group, layout)
        copies = copies_to_defeat_l2(wbytes)
        weights = [quantized_weight(k, n, bits, group, layout, seed=i) for i in range(copies)]
        calls = [lambda w=w: lm.lowbit_matmul(x, *w, bits, group, layout) for w in weights]
        t_graph = graph_time_us(calls)
        t_eager = eager_time_us(calls[0]) if eager else None
        kernel = _path_taken(x, weights[0], bits, group, layout)
        ref = lm.lowbit_matmul_reference(x.float(), *weights[0], bits, group, layout)
        err = ((calls[0]().float() - ref).norm() / ref.norm()).item()
        moved = wbytes + m * k * 2 + m * n * 2
        rows.append({
            "K": k, "N": n, "M": m, "bits": bits, "group_size": group, "group_dim": layout, "kernel": kernel,
            "rel_err_vs_reference": err,
            "graph_us": t_graph, "eager_us": t_eager, "bf16_graph_us": bf16_graph, "bf16_eager_us": bf16_eager,
            "speedup_graph": bf16_graph / t_graph, "speedup_eager": (bf16_eager / t_eager) if eager else None,
            "weight_bytes": wbytes, "bytes_moved": moved, "GBps": moved / t_graph / 1e3,
            "frac_copy_bw": moved / t_graph / 1e3 / copy_gbps, "tflops": 2 * m * n * k / t_graph / 1e6,
            "weight_memory_ratio": n * k * 2 / wbytes,
        })
        del weights, calls
    return rows


def _path_taken(x, w, bits: int, group: int, layout: str) -> str:
    """Which implementation `lowbit_matmul` ran: "gemv", "mma" (fused tensor-core tiles) or "dense"."""
    if lm.uses_gemv(x, bits, group, layout):
        return "gemv"
    if x.shape[0] >= lm.PREFILL_MIN_M:
        return lm._prefill_path(x, *w, bits, group, layout, None)
    return "mma"


def lm_head_us(m: int) -> float:
    k, n = LLAMA3_8B["hidden"], LLAMA3_8B["vocab"]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)  # 1 GB: bigger than L2 on its own
    return graph_time_us([lambda: F.linear(x, w)])


def decode_estimate(rows: list[dict], head_us: float) -> dict:
    """Batch-1 tokens/s counting only the linear layers (+ the bf16 lm_head): an upper bound for decode."""
    out = {}
    per_layer = LLAMA3_8B["per_layer"]
    for bits, group, layout in [("bf16", None, None)] + VARIANTS:
        total = 0.0
        for k, n, count in per_layer:
            match = [r for r in rows if (r["K"], r["N"], r["M"]) == (k, n, 1)
                     and (bits == "bf16" or (r["bits"], r["group_size"], r["group_dim"]) == (bits, group, layout))]
            if not match:
                break
            total += count * (match[0]["bf16_graph_us"] if bits == "bf16" else match[0]["graph_us"])
        else:
            us = LLAMA3_8B["layers"] * total + head_us
            name = "bf16" if bits == "bf16" else f"W{bits}g{group}-{layout}"
            out[name] = {"linear_us_per_token": us, "tokens_per_s": 1e6 / us}
    return out


def check_cases() -> list[tuple]:
    """(K, N, M, bits, group, layout): a Llama down_proj at decode and prefill sizes for every bit width and
    layout, and SmolLM2-sized layers whose K (576, 1536) leaves a masked tail step, with a whole-row group."""
    cases = [(14336, 4096, m, bits, group, layout) for m in (1, 16, 300) for bits in (2, 3, 4, 8)
             for group, layout in ((128, "oc"), (64, "ic"), (32, "oc"))]
    cases += [(k, n, m, bits, 64, layout) for k, n in ((576, 1536), (1536, 576)) for m in (1, 5) for bits in (3, 4)
              for layout in ("oc", "ic")]
    cases += [(576, 1536, m, 4, 576, "oc") for m in (1, 5)]
    return cases


def _paths(x, bits: int, group: int, layout: str) -> list[str]:
    return ["gemv", "mma"] if x.shape[0] == 1 and lm.gemv_supported(x, bits, group, layout) else ["mma"]


def check(workers: int) -> list[str]:
    """Every kernel path, bit width and layout against the reference (first candidate tile of each, compiled
    in parallel first); returns the failures."""
    cases = check_cases()
    tasks = []
    for k, n, m, bits, group, layout in cases:
        x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        for kernel in _paths(x, bits, group, layout):
            w = quantized_weight(k, n, bits, group, layout)
            cfg = lm.candidate_configs(x, *w, bits, group, layout, kernel=kernel)[:1]
            tasks.append((k, n, m, bits, group, layout, kernel, cfg, True))
    parallel_compile(tasks, workers)
    fails = []
    for k, n, m, bits, group, layout in cases:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed, scale, zero = quantized_weight(k, n, bits, group, layout, seed=bits)
        bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
        ref = lm.lowbit_matmul_reference(x.float(), packed, scale, zero, bits, group, layout, bias.float())
        for kernel in _paths(x, bits, group, layout):
            fn = lm.lowbit_gemv_triton if kernel == "gemv" else lm.lowbit_mma_triton
            cfg = lm.candidate_configs(x, packed, scale, zero, bits, group, layout, kernel=kernel)[0]
            y = fn(x, packed, scale, zero, bits, group, layout, bias, config=cfg).float()
            err = ((y - ref).norm() / ref.norm()).item()
            ok = err < 1e-2 and bool(torch.isfinite(y).all())
            line = f"check K={k} N={n} M={m} W{bits} g{group} {layout} {kernel}: rel err {err:.2e}"
            print(line + ("" if ok else "  FAIL"), flush=True)
            if not ok:
                fails.append(line)
    return fails


def check_all_tiles(workers: int) -> list[str]:
    """Every autotune candidate tile (not only the first) of each kernel against the reference, so that no
    tile the autotuner may pick computes a wrong result; returns the failures."""
    k, n = 4096, 6144
    variants = [(4, 128, "oc"), (4, 64, "ic"), (3, 128, "ic"), (3, 64, "oc"), (2, 128, "ic"), (8, 64, "oc")]
    plan = []
    for m in (1, 16, 256):
        x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
        for bits, group, layout in variants:
            w = quantized_weight(k, n, bits, group, layout)
            for kernel in _paths(x, bits, group, layout):
                cfgs = lm.candidate_configs(x, *w, bits, group, layout, kernel=kernel)
                plan.append((k, n, m, bits, group, layout, kernel, cfgs, False))
    parallel_compile(plan, workers)
    fails = []
    for k, n, m, bits, group, layout, kernel, cfgs, _ in plan:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        w = quantized_weight(k, n, bits, group, layout, seed=m)
        ref = lm.lowbit_matmul_reference(x.float(), *w, bits, group, layout)
        fn = lm.lowbit_gemv_triton if kernel == "gemv" else lm.lowbit_mma_triton
        for cfg in cfgs:
            err = ((fn(x, *w, bits, group, layout, config=cfg).float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                fails.append(f"tile M={m} W{bits} g{group} {layout} {kernel} {cfg}: rel err {err:.2e}")
                print(fails[-1], flush=True)
    print(f"checked {sum(len(p[7]) for p in plan)} tiles", flush=True)
    return fails


# GEMV grid swept besides the kernel's own candidates: rows a program, units a chunk, (chunks a step, warps),
# prefetch, fp16-pair sums.
SWEEP_GEMV_GRID = [(bn, nc, u, wp, False, half) for half in (False, True) for bn in (2, 4, 8) for u in (1, 2, 4)
                   for nc, wp in ((32, 1), (64, 2), (128, 4))]


def _sweep_configs(x, w, bits, group, layout, kernel) -> list[dict]:
    cands = lm.candidate_configs(x, *w, bits, group, layout, kernel=kernel)  # GEMV: every fitting candidate
    if kernel == "gemv":
        k, n = x.shape[1], w[0].shape[0]
        for cfg in SWEEP_GEMV_GRID:
            kw = lm._gemv_kwargs(cfg)
            if cfg[2] >= lm.gemv_min_units(bits) and lm._gemv_fits(cfg, bits, group, layout == "ic", k, n) \
                    and kw not in cands:
                cands.append(kw)
    return cands[:2] if kernel == "mma" and x.shape[0] == 1 else cands


def sweep(shapes, ms, workers: int) -> list[dict]:
    """Graph time of every candidate tile (and extra GEMV tiles) for W4/W3 g128 in both layouts."""
    variants = [(4, 128, "oc"), (4, 128, "ic"), (3, 128, "oc"), (3, 128, "ic")]
    plan = []
    for k, n in shapes:
        for m in ms:
            x = torch.empty(m, k, device="cuda", dtype=torch.bfloat16)
            for bits, group, layout in variants:
                w = quantized_weight(k, n, bits, group, layout)
                for kernel in (["gemv", "mma"] if m == 1 else ["mma"]):
                    plan.append((k, n, m, bits, group, layout, kernel, _sweep_configs(x, w, bits, group, layout, kernel),
                                 False))
    t0 = time.time()
    print(f"sweep: compiled {parallel_compile(plan, workers)} variants in {time.time() - t0:.0f} s", flush=True)
    out = []
    for k, n, m, bits, group, layout, kernel, cfgs, _ in plan:
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wbytes = weight_bytes(k, n, bits, group, layout)
        wts = [quantized_weight(k, n, bits, group, layout, seed=i) for i in range(copies_to_defeat_l2(wbytes))]
        fn = lm.lowbit_gemv_triton if kernel == "gemv" else lm.lowbit_mma_triton
        for cfg in cfgs:
            try:
                t = graph_time_us([lambda w=w, c=cfg: fn(x, *w, bits, group, layout, config=c) for w in wts])
            except Exception as err:  # a tile that does not compile or launch here: record why
                t = float("nan")
                print(f"  {kernel} {cfg}: {type(err).__name__}: {str(err)[:300]}", flush=True)
            short = {a: b for a, b in cfg.items() if a in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "NCHUNK", "UNITS", "PREFETCH",
                                                             "HALF", "num_warps", "num_stages")}
            out.append({"K": k, "N": n, "M": m, "bits": bits, "group_size": group, "group_dim": layout,
                        "kernel": kernel, "config": short, "graph_us": t, "weight_GBps": wbytes / t / 1e3})
            print(f"sweep {k}x{n} M={m} W{bits} {layout} {kernel} {short}: {t:.1f} us, "
                  f"{wbytes / t / 1e3:.0f} GB/s", flush=True)
        del wts
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="lowbit_gemm.json")
    parser.add_argument("--ms", type=int, nargs="*", help=f"rows of x (default {MS}; --sweep: 1 16 2048)")
    parser.add_argument("--no-eager", action="store_true", help="skip the do_bench (eager) timings")
    parser.add_argument("--check", action="store_true", help="only check correctness at the benchmark shapes")
    parser.add_argument("--sweep", action="store_true", help="only time every candidate tile")
    parser.add_argument("--workers", type=int, default=min(14, os.cpu_count() or 1), help="compile processes")
    args = parser.parse_args()
    t0 = time.time()
    if args.check:
        fails = check(args.workers) + check_all_tiles(args.workers)
        print(f"{len(fails)} failures ({time.time() - t0:.0f} s)")
        sys.exit(1 if fails else 0)
    if args.sweep:
        rows = sweep([(4096, 14336), (14336, 4096)], args.ms or [1, 16, 2048], args.workers)
        with open(args.json, "w") as f:
            json.dump({"env": env_info(), "sweep": rows}, f, indent=1)
        print(f"wrote {args.json} ({time.time() - t0:.0f} s)")
        return
    tasks = [(k, n, m, b, g, lay) for k, n in SHAPES for m in (args.ms or MS) for b, g, lay in VARIANTS]
    compiled = precompile(tasks, args.workers)
    print(f"compiled {compiled} kernel variants in {time.time() - t0:.0f} s", flush=True)
    copy_gbps = copy_bandwidth_gbps()
    print(f"device copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    names = [f"W{b}g{g}{lay}" for b, g, lay in VARIANTS]
    print(f"{'K×N':>11} {'M':>5} | {'bf16 µs':>8} | " + " ".join(f"{v:>9}" for v in names)
          + "  (speed-up vs bf16, CUDA graph; g/m/d = GEMV, fused tiles, dense; last: best %copy-BW)")
    rows, bf16_cache = [], {}
    out = {"env": env_info(), "date": time.strftime("%Y-%m-%d"), "copy_GBps": copy_gbps, "rows": rows}
    for k, n in SHAPES:
        for m in args.ms or MS:
            case = bench_case(k, n, m, not args.no_eager, copy_gbps, bf16_cache)
            rows += case
            with open(args.json, "w") as f:  # partial results survive a crash or a time limit
                json.dump(out, f, indent=1)
            cells = " ".join(f"{r['speedup_graph']:>7.2f}x{r['kernel'][0]}" for r in case)
            best = max(r["frac_copy_bw"] for r in case)
            print(f"{k:>5}×{n:<5} {m:>5} | {case[0]['bf16_graph_us']:>8.1f} | {cells}  {best:.0%}", flush=True)
            bad = [r for r in case if not r["rel_err_vs_reference"] < 2e-2]
            if bad:
                print(f"  WRONG RESULT (rel err ≥ 2e-2): {[(r['bits'], r['group_size'], r['group_dim']) for r in bad]}")
    head = lm_head_us(1)
    estimate = decode_estimate(rows, head)
    for name, e in estimate.items():
        print(f"decode estimate (linears + bf16 lm_head only), {name}: {e['tokens_per_s']:.0f} tok/s")
    out.update(lm_head_bf16_us=head, decode_estimate=estimate, wall_s=time.time() - t0)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(f"wrote {args.json} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
