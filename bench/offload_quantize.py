"""Quantize a model larger than the GPU budget: a Llama-3-8B-architecture model with random bf16 weights sits on
CPU and is calibrated and quantized one decoder block at a time on one GPU (`calibration_device`, offload.py).

Two runs on freshly built models: one uncapped, then the same with `torch.cuda.set_per_process_memory_fraction`
capping GPU memory below the model's bf16 size (default "auto": 1 GiB above the first run's peak reserved
memory, rounded up, so the check is "it fits below the model size"; or a number, e.g. `--cap-gib 8`). Reports
peak GPU memory (`max_memory_allocated` / `max_memory_reserved`, overall and per block), wall time, the capture
time, the time per block and the model size, and estimates the full 32-layer time from the per-block mean when
fewer layers are run. No network and no dataset: calibration text is a built-in paragraph tokenized byte by
byte (the weights are random, so the text does not matter; only its size does).

    # H100, W8A8 default config (OutlierTune, GPTQ on quantized inputs), full 8B, 16 x 512 calibration tokens
    python bench/offload_quantize.py --json docs/offload_llama8b_h100.json
    # AdaDim weight-only W4 g128 (GPTQ, adaptive layouts), 4 blocks -> per-block time and the 32-layer estimate
    python bench/offload_quantize.py --mode weight-only --layers 4 --json docs/offload_llama8b_w4_h100.json
    # CPU smoke run (small dimensions, every move is a no-op)
    python bench/offload_quantize.py --layers 2 --device cpu --small
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import time
from contextlib import contextmanager
from types import SimpleNamespace

import torch
import torch.nn as nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.initialization import no_init_weights

import hf_outliertune
from hf_outliertune import OutlierTuneConfig
from hf_outliertune.offload import Offload

GIB = 2**30
FULL_LAYERS = 32
LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)
SMALL = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=2048)
TEXT = (
    "Post-training quantization maps the weights and activations of a trained network onto a small integer "
    "grid. Large language models make activation quantization hard: a few channels carry values a hundred "
    "times larger than the rest, and a shared step either clips them or rounds every other channel to zero. "
    "Per-channel steps folded into the preceding normalization avoid both, at no cost at run time. Weight-only "
    "quantization keeps activations in floating point and stores the weights in groups of 128 values with a "
    "scale and a zero point each; adaptive group layouts choose, per layer, the dimension the groups follow. "
)


class ByteTokenizer:
    """Offline stand-in for a tokenizer: one token per UTF-8 byte (ids 1..256)."""

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = False):
        ids = torch.tensor(list(text.encode("utf-8")), dtype=torch.long) + 1
        return SimpleNamespace(input_ids=ids[None])


def calibration_text(tokens: int) -> str:
    return TEXT * (tokens // len(TEXT.encode("utf-8")) + 2)


def build_model(layers: int, dims: dict, seed: int) -> nn.Module:
    """A bf16 Llama on CPU with random weights (N(0, 0.02)-like, norms 1), built without the slow default init:
    every matrix is filled from one random pool at a random offset (a memcpy instead of sampling 8B values)."""
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **dims)
    with no_init_weights(), torch.device("cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    gen = torch.Generator().manual_seed(seed)
    pool_len = 1 << 24
    pool = (torch.randn(pool_len, generator=gen) * 0.02).to(torch.bfloat16)
    pool = torch.cat([pool, pool])
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)  # RMSNorm weights
                continue
            flat = p.view(-1)
            offset = int(torch.randint(pool_len, (1,), generator=gen))
            for start in range(0, flat.numel(), pool_len):
                n = min(pool_len, flat.numel() - start)
                flat[start : start + n].copy_(pool[offset : offset + n])
    return model.eval().requires_grad_(False)


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_stats(device: torch.device) -> dict[str, float | None]:
    if device.type != "cuda":
        return {"allocated_gib": None, "reserved_gib": None}
    return {"allocated_gib": torch.cuda.max_memory_allocated(device) / GIB,
            "reserved_gib": torch.cuda.max_memory_reserved(device) / GIB}


@contextmanager
def timed_blocks(device: torch.device, blocks: list[dict], marks: dict):
    """Time each `Offload.block` (one decoder block: move in, calibrate, quantize, move back) and record its
    peak GPU memory; the peak before the first block is the capture pass's."""
    original = Offload.block

    @contextmanager
    def block(self, layer):
        sync(device)
        if not blocks:
            marks["first_block"] = time.perf_counter()
            marks["capture_peak"] = gpu_stats(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        start = time.perf_counter()
        with original(self, layer):
            yield
        sync(device)
        blocks.append({"block": len(blocks), "seconds": time.perf_counter() - start, **gpu_stats(device)})
        marks["last_block"] = time.perf_counter()

    Offload.block = block
    try:
        yield
    finally:
        Offload.block = original


def quant_config(args: argparse.Namespace) -> OutlierTuneConfig:
    common = dict(dataset=[calibration_text(args.num_samples * args.seq_len)], tokenizer=ByteTokenizer(),
                  num_samples=args.num_samples, seq_len=args.seq_len, calibration_batch_size=args.batch_size)
    if args.algorithm:
        common["weight_algorithm"] = args.algorithm
    if args.mode == "weight-only":
        return OutlierTuneConfig(act_bits=None, weight_bits=args.weight_bits or 4, group_size=args.group_size,
                                 **common)
    return OutlierTuneConfig(weight_bits=args.weight_bits or 8, **common)


def run_once(args: argparse.Namespace, dims: dict, device: torch.device, cap_gib: float | None) -> dict:
    t0 = time.perf_counter()
    model = build_model(args.layers, dims, args.seed)
    build_s = time.perf_counter() - t0
    model_bytes = tensor_bytes(model)
    result: dict = {"cap_gib": cap_gib, "build_s": build_s}
    if device.type == "cuda":
        torch.cuda.empty_cache()
        if cap_gib is not None:
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)
        torch.cuda.reset_peak_memory_stats(device)
    blocks: list[dict] = []
    marks: dict = {}
    config = quant_config(args)
    sync(device)
    start = time.perf_counter()
    try:
        with timed_blocks(device, blocks, marks):
            hf_outliertune.quantize(model, config, device=str(device))
        sync(device)
        result["ok"] = True
    except torch.OutOfMemoryError as err:
        result.update(ok=False, error=f"OutOfMemoryError: {str(err).splitlines()[0]}")
    finally:
        if device.type == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    end = time.perf_counter()
    peaks = [marks.get("capture_peak", gpu_stats(device)), *blocks, gpu_stats(device)]
    result.update(
        wall_s=end - start,
        capture_s=marks.get("first_block", end) - start,
        after_blocks_s=end - marks.get("last_block", end),
        blocks=blocks,
        peak_allocated_gib=max((p["allocated_gib"] for p in peaks if p["allocated_gib"] is not None), default=None),
        peak_reserved_gib=max((p["reserved_gib"] for p in peaks if p["reserved_gib"] is not None), default=None),
        capture_peak_allocated_gib=marks.get("capture_peak", {}).get("allocated_gib"),
        model_bf16_gib=model_bytes / GIB,
    )
    if result["ok"]:
        where = {t.device.type for t in (*model.parameters(), *model.buffers())}
        result["model_devices_after"] = sorted(where)
        result["quantized_model_gib"] = tensor_bytes(model) / GIB
        if blocks:
            mean = sum(b["seconds"] for b in blocks) / len(blocks)
            result["mean_block_s"] = mean
            result["estimated_full_model_s"] = result["capture_s"] + mean * FULL_LAYERS + result["after_blocks_s"]
    del model
    gc.collect()
    return result


def sizes(dims: dict, layers: int, args: argparse.Namespace) -> dict:
    h, f, v = dims["hidden_size"], dims["intermediate_size"], dims["vocab_size"]
    kv = h // dims["num_attention_heads"] * dims["num_key_value_heads"]
    block = 2 * (h * h + 2 * h * kv + h * h + 3 * h * f + 2 * h)
    return {
        "block_bf16_gib": block / GIB,
        "embed_plus_head_bf16_gib": 2 * 2 * v * h / GIB,
        "model_bf16_gib": (layers * block + 2 * 2 * v * h + 2 * h) / GIB,
        "full_32_layer_bf16_gib": (FULL_LAYERS * block + 2 * 2 * v * h + 2 * h) / GIB,
        "cpu_hidden_states_gib": args.num_samples * args.seq_len * h * 2 / GIB,
    }


def env(device: torch.device) -> dict:
    import transformers

    info = {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_total_gib=props.total_memory / GIB, cuda=str(torch.version.cuda))
    return info


def print_table(name: str, r: dict) -> None:
    f = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    status = "ok" if r["ok"] else r["error"]
    print(f"\n== {name} run (cap {r['cap_gib'] if r['cap_gib'] is not None else 'none'} GiB): {status}")
    print(f"  model bf16 {r['model_bf16_gib']:.2f} GiB | peak GPU allocated {f(r['peak_allocated_gib'])} GiB, "
          f"reserved {f(r['peak_reserved_gib'])} GiB (capture pass {f(r['capture_peak_allocated_gib'])} GiB)")
    print(f"  wall {r['wall_s']:.1f} s = capture {r['capture_s']:.1f} s + {len(r['blocks'])} blocks + "
          f"{r['after_blocks_s']:.1f} s after | model build {r['build_s']:.1f} s")
    if r.get("mean_block_s"):
        print(f"  mean block {r['mean_block_s']:.2f} s -> estimated {FULL_LAYERS}-layer model "
              f"{r['estimated_full_model_s']:.0f} s; devices after: {r.get('model_devices_after')}")
    print(f"  {'block':>5} {'seconds':>8} {'alloc GiB':>10} {'reserved GiB':>13}")
    for b in r["blocks"]:
        print(f"  {b['block']:>5} {b['seconds']:>8.2f} {f(b['allocated_gib']):>10} {f(b['reserved_gib']):>13}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder blocks (32 = Llama-3-8B)")
    parser.add_argument("--mode", choices=("w8a8", "weight-only"), default="w8a8",
                        help="w8a8: the default OutlierTuneConfig; weight-only: AdaDim (act_bits=None)")
    parser.add_argument("--algorithm", default=None,
                        help="weight_algorithm (default: the config's, gptq; w8a8 also absmax/mse, weight-only rtn)")
    parser.add_argument("--weight-bits", type=int, default=None, help="default 8 (w8a8) or 4 (weight-only)")
    parser.add_argument("--group-size", type=int, default=128, help="weight-only group size")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8, help="calibration_batch_size")
    parser.add_argument("--device", default="cuda", help="execution device (the model stays on CPU)")
    parser.add_argument("--cap-gib", default="auto",
                        help="GPU memory cap of the second run: 'auto', a number of GiB, or 'none' (no capped run)")
    parser.add_argument("--runs", choices=("both", "uncapped", "capped"), default="both")
    parser.add_argument("--small", action="store_true", help="hidden 256, intermediate 512, vocab 2048 (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dims = SMALL if args.small else LLAMA3_8B
    size = sizes(dims, args.layers, args)
    out = {"env": env(device), "date": time.strftime("%Y-%m-%d"), "args": vars(args), "dims": dims, "sizes": size,
           "runs": {}}
    print(f"Llama ({'small' if args.small else '8B'} dims) x {args.layers} layers on CPU, {args.mode}, calibrated on "
          f"{device}: model {size['model_bf16_gib']:.2f} GiB bf16, block {size['block_bf16_gib']:.3f} GiB, "
          f"{args.num_samples}x{args.seq_len} tokens ({size['cpu_hidden_states_gib']:.3f} GiB of hidden states on CPU)")

    if args.runs in ("both", "uncapped"):
        out["runs"]["uncapped"] = run_once(args, dims, device, None)
        print_table("uncapped", out["runs"]["uncapped"])
    if args.runs in ("both", "capped") and args.cap_gib != "none" and device.type == "cuda":
        if args.cap_gib == "auto":
            first = out["runs"].get("uncapped", {})
            cap = math.ceil(first["peak_reserved_gib"]) + 1 if first.get("ok") else 8.0
        else:
            cap = float(args.cap_gib)
        out["runs"]["capped"] = run_once(args, dims, device, cap)
        out["runs"]["capped"]["cap_below_model_bf16"] = cap < size["model_bf16_gib"]
        print_table("capped", out["runs"]["capped"])
        verdict = "fits" if out["runs"]["capped"]["ok"] else "does NOT fit"
        print(f"\nQuantization {verdict} in {cap:g} GiB of GPU memory; the model is {size['model_bf16_gib']:.2f} GiB "
              f"in bf16 ({'below' if cap < size['model_bf16_gib'] else 'NOT below'} it).")

    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {args.json}")
    return 0 if all(r["ok"] for r in out["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
