"""torch.profiler trace of compiled decode steps (static cache) or of an eager prefill, bf16 vs the quantized
variants of `bench/e2e_llama.py`, on a few Llama-3-8B-shaped layers.

    python bench/profile_decode.py [--layers 4] [--steps 10] [--variants bf16 w8a8 w4]
    python bench/profile_decode.py --prefill 1x2048     # eager prefill: CPU and CUDA time per op

Prints the kernels by total CUDA time for each model; used to find where time goes (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import StaticCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import e2e_llama  # noqa: E402


@torch.no_grad()
def trace(variant: str, layers: int, steps: int) -> str:
    torch.manual_seed(0)
    model = _build(variant, layers)
    cache = StaticCache(config=model.config, max_cache_len=256)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), device="cuda")
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(128, device="cuda"), logits_to_keep=1)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    token = ids[:, -1:].clone()

    def step(i: int) -> None:
        forward(input_ids=token, past_key_values=cache, cache_position=torch.tensor([128 + i], device="cuda"))

    for i in range(5):
        step(i)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(5, 5 + steps):
            step(i)
        torch.cuda.synchronize()
    torch._dynamo.reset()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=70)


def _build(variant: str, layers: int) -> torch.nn.Module:
    model = e2e_llama.build_bf16(layers)
    if variant == "w8a8":
        e2e_llama.to_random_w8a8(model)
    elif variant in e2e_llama.WEIGHT_ONLY:
        e2e_llama.to_weight_only(model, *e2e_llama.WEIGHT_ONLY[variant])
    return model


@torch.no_grad()
def trace_prefill(variant: str, layers: int, batch: int, seq: int) -> str:
    """Eager prefill (no cache), CPU and CUDA activities: shows whether the host or the GPU bounds it."""
    torch.manual_seed(0)
    model = _build(variant, layers)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    for _ in range(2):
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, use_cache=False, logits_to_keep=1)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=e2e_llama.VARIANTS, default=["bf16", "w8a8"])
    parser.add_argument("--prefill", help="BATCHxSEQ: profile an eager prefill instead of decode")
    args = parser.parse_args()
    for variant in args.variants:
        if args.prefill:
            batch, seq = (int(v) for v in args.prefill.split("x"))
            print(f"===== {variant} prefill {args.prefill}\n{trace_prefill(variant, args.layers, batch, seq)}",
                  flush=True)
        else:
            print(f"===== {variant}\n{trace(variant, args.layers, args.steps)}", flush=True)


if __name__ == "__main__":
    main()
