"""End-to-end OutlierTune W8A8 and AdaDim weight-only vs bf16 on a Llama-3-8B-architecture model with random
weights (GPU, no download).

Measured in one run on the same model: prefill latency (1×2048 and 8×512 tokens, no cache), decode tokens/s
(batch 1 and 16, static KV cache, one decode step captured in a CUDA graph and replayed), peak GPU memory of
the prefill, weight memory, and the size of the saved checkpoint. The W8A8 model is built the way a calibrated
one looks at run time (static per-channel inputs with the norm fused into the quantizer for q/k/v/gate/up,
dynamic per-token inputs with the block-Hadamard rotation for o/down, int8 weights with per-channel scales);
its weights are the random bf16 weights quantized per channel (speed does not depend on calibration);
`w8a8_tables` also stores the embedding table and the lm_head as 8-bit weight-only codes (`embedding_bits=8`). The
weight-only variants (`w4`, `w3`: g128, per-OC or per-IC groups) hold the random weights RTN-quantized into
`WeightOnlyLinear`s (packed codes, fused low-bit kernels); activations stay bf16.

    python bench/e2e_llama.py --json docs/e2e_llama8b_h100.json [--layers 32] [--variants bf16 w8a8 w4 w3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from transformers import AutoConfig, AutoModelForCausalLM, StaticCache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import env_info, graph_time_us  # noqa: E402

from hf_outliertune import OutlierTuneConfig  # noqa: E402
from hf_outliertune.adadim import quantize_rtn  # noqa: E402
from hf_outliertune.architectures import decoder_layers, resolve_arch  # noqa: E402
from hf_outliertune.embeddings import quantize_embeddings  # noqa: E402
from hf_outliertune.fusion import fuse_activation_quant  # noqa: E402
from hf_outliertune.modules import OutlierTuneLinear  # noqa: E402
from hf_outliertune.quant_math import quantize_weight, weight_scales_absmax  # noqa: E402
from hf_outliertune.quantizer import OutlierTuneHfQuantizer  # noqa: E402
from hf_outliertune.rotation import hadamard_block_size  # noqa: E402
from hf_outliertune.weight_only_linear import WeightOnlyLinear  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
    vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_bf16(layers: int) -> torch.nn.Module:
    config = AutoConfig.for_model("llama", num_hidden_layers=layers, **LLAMA3_8B)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def to_random_w8a8(model: torch.nn.Module) -> OutlierTuneConfig:
    """Replace every decoder linear in place by an `OutlierTuneLinear` with the run-time layout of a calibrated one."""
    spec = resolve_arch(model)
    norm_fed = {name for group in spec.norm_groups for name in group.linears}
    formats = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name in spec.all_linears:
            linear = layer.get_submodule(name)
            static = name in norm_fed
            block = 1 if static else hadamard_block_size(linear.in_features)
            q = OutlierTuneLinear(linear.in_features, linear.out_features, bias=False,
                                  act_mode="static" if static else "dynamic", has_input_offset=static,
                                  weight_bits=8, act_bits=8, hadamard_block=block, dtype=torch.bfloat16,
                                  device="cuda")
            scale = weight_scales_absmax(linear.weight, 8)
            q.weight.data = quantize_weight(linear.weight, scale, 8)
            q.weight_scale.copy_(scale)
            if static:
                q.input_offset.zero_()
            layer.set_submodule(name, q)
            formats[f"{spec.layers_path}.{i}.{name}"] = q.format
    config = OutlierTuneConfig(module_formats=formats, calibration_summary={"note": "random weights, no calibration"})
    model.config.quantization_config = config
    model.hf_quantizer = OutlierTuneHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    fuse_activation_quant(model)
    return config


@torch.no_grad()
def with_tables(model: torch.nn.Module, config: OutlierTuneConfig, bits: int = 8) -> OutlierTuneConfig:
    """Also quantize the embedding table and the lm_head (`embedding_bits`), as the quantize-on-load path does."""
    config.module_formats.update(quantize_embeddings(model, bits))
    config.embedding_bits = bits
    return config


# weight-only variants: (bits, group size, group layout)
WEIGHT_ONLY = {"w4": (4, 128, "oc"), "w3": (3, 128, "oc"), "w4ic": (4, 128, "ic"), "w3ic": (3, 128, "ic")}
VARIANTS = ("bf16", "w8a8", "w8a8_tables", *WEIGHT_ONLY)


@torch.no_grad()
def to_weight_only(model: torch.nn.Module, bits: int, group_size: int, group_dim: str) -> OutlierTuneConfig:
    """Replace every decoder linear in place by a `WeightOnlyLinear` holding its RTN-quantized random weight."""
    spec = resolve_arch(model)
    formats = {}
    for i, layer in enumerate(decoder_layers(model, spec)):
        for name in spec.all_linears:
            linear = layer.get_submodule(name)
            q = WeightOnlyLinear.from_quantized(quantize_rtn(linear.weight, bits, group_size, group_dim), None,
                                                torch.bfloat16)
            layer.set_submodule(name, q)
            formats[f"{spec.layers_path}.{i}.{name}"] = q.format
    config = OutlierTuneConfig(act_bits=None, weight_bits=bits, group_size=group_size, group_dim=group_dim,
                               weight_algorithm="rtn", module_formats=formats,
                               calibration_summary={"note": "random weights, no calibration"})
    model.config.quantization_config = config
    model.hf_quantizer = OutlierTuneHfQuantizer(config, pre_quantized=True)
    model.is_quantized = True
    return config


def cuda_time_ms(fn, repeats: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def prefill(model, batch: int, seq: int) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    model(input_ids=ids, use_cache=False, logits_to_keep=1)  # warm-up / autotune
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    ms = cuda_time_ms(lambda: model(input_ids=ids, use_cache=False, logits_to_keep=1))
    return {"ms": ms, "tokens_per_s": batch * seq / ms * 1000, "peak_GiB": torch.cuda.max_memory_allocated() / 2**30}


@torch.no_grad()
def prefill_graph(model, batch: int, seq: int) -> dict:
    """Prefill latency with the forward compiled (`torch.compile(mode="reduce-overhead")`: Inductor + a CUDA
    graph), which removes the per-kernel host launch cost that can bound an eager prefill."""
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    t_compile = time.time()
    for _ in range(3):  # compile, record the graph, replay
        forward(input_ids=ids, use_cache=False, logits_to_keep=1)
    torch.cuda.synchronize()
    t_compile = time.time() - t_compile
    ms = cuda_time_ms(lambda: forward(input_ids=ids, use_cache=False, logits_to_keep=1))
    torch._dynamo.reset()
    return {"ms": ms, "tokens_per_s": batch * seq / ms * 1000, "compile_s": t_compile}


@torch.no_grad()
def decode(model, batch: int, prompt: int = 128, steps: int = 32) -> dict:
    """Single-token decode steps with a static KV cache, measured two ways.

    `ms_per_step`: the forward compiled with `torch.compile(mode="reduce-overhead")` (Inductor + CUDA graphs), as
    `generate` does with a static cache, driven from Python step by step; `host_ms_per_step` is the host's time to
    issue a step, and where it reaches the GPU time the figure is host-bound (and varies with the host).
    `graph_ms_per_step`: one whole step (compiled forward, argmax, position update) captured in a CUDA graph and
    replayed, the GPU's time alone, as a serving engine runs it.
    """
    cache = StaticCache(config=model.config, max_cache_len=prompt + 6 * steps + 16)
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda")
    model(input_ids=ids, past_key_values=cache, cache_position=torch.arange(prompt, device="cuda"), logits_to_keep=1)
    forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    next_ids = ids[:, -1:].clone()
    position = prompt

    def run(n: int) -> None:
        nonlocal position, next_ids
        for _ in range(n):
            pos = torch.tensor([position], device="cuda")
            logits = forward(input_ids=next_ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
            next_ids = logits[:, -1:].argmax(-1)
            position += 1

    t_compile = time.time()
    run(3)  # compile, record the graphs
    torch.cuda.synchronize()
    t_compile = time.time() - t_compile
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    t_host = time.perf_counter()
    run(steps)
    t_host = time.perf_counter() - t_host
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    torch._dynamo.reset()
    out = {"ms_per_step": ms, "tokens_per_s": batch / ms * 1000, "host_ms_per_step": t_host * 1000 / steps,
           "compile_s": t_compile}
    try:
        out.update(decode_graph(model, cache, next_ids, position))
    except Exception as err:  # e.g. a model whose step cannot be captured: keep the other figures
        out["graph_error"] = f"{type(err).__name__}: {str(err)[:300]}"
    return out


@torch.no_grad()
def decode_graph(model, cache, next_ids: torch.Tensor, position: int) -> dict:
    """GPU time of a decode step: compiled forward (no CUDA graphs of its own), argmax and the position update
    captured together in a CUDA graph and replayed (`timing.graph_time_us`: warm-up and compilation outside the
    capture, the median of 10 replays of 3 steps)."""
    forward = torch.compile(model.forward, fullgraph=True)
    ids = next_ids.clone()
    pos = torch.tensor([position], device="cuda")

    def step() -> None:
        logits = forward(input_ids=ids, past_key_values=cache, cache_position=pos, use_cache=True).logits
        ids.copy_(logits[:, -1:].argmax(-1))
        pos.add_(1)

    ms = graph_time_us([step]) / 1000
    torch._dynamo.reset()
    return {"graph_ms_per_step": ms, "graph_tokens_per_s": ids.shape[0] / ms * 1000}


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def measure(model, only: str | None = None) -> dict:
    """Weight memory, then the prefill and decode rows (`only`: one of the two)."""
    out = {"weight_GiB": weight_bytes(model) / 2**30}
    for b, s in () if only == "decode" else ((1, 2048), (8, 512)):
        out[f"prefill_{b}x{s}"] = prefill(model, b, s)
        print(f"prefill_{b}x{s}", out[f"prefill_{b}x{s}"], flush=True)
    if only != "decode":
        out["prefill_1x2048_graph"] = prefill_graph(model, 1, 2048)
        print("prefill_1x2048_graph", out["prefill_1x2048_graph"], flush=True)
    for b in () if only == "prefill" else (1, 16):
        out[f"decode_b{b}"] = decode(model, b)
        print(f"decode_b{b}", out[f"decode_b{b}"], flush=True)
    return out


def checkpoint_GiB(model) -> float:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as d:
        model.save_pretrained(d)
        return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="e2e_llama.json")
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--no-save", action="store_true", help="skip writing the W8A8 checkpoint")
    parser.add_argument("--variant", choices=VARIANTS, help="measure one model in this process and write its part "
                        "to JSON.variant; without it every --variants one runs in a subprocess (fresh GPU memory)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["bf16", "w8a8", "w4", "w3"])
    parser.add_argument("--only", choices=("prefill", "decode"), help="measure weight memory and these rows only")
    args = parser.parse_args()
    t0 = time.time()
    if args.variant:
        torch.manual_seed(0)
        model = build_bf16(args.layers)
        if args.variant == "w8a8":
            to_random_w8a8(model)
        elif args.variant == "w8a8_tables":
            with_tables(model, to_random_w8a8(model))
        elif args.variant in WEIGHT_ONLY:
            to_weight_only(model, *WEIGHT_ONLY[args.variant])
        torch.cuda.empty_cache()
        result = {"after_build_GiB": torch.cuda.memory_allocated() / 2**30, **measure(model, args.only)}
        print(args.variant, json.dumps(result, indent=1), flush=True)
        if args.variant != "bf16" and not args.no_save:
            torch._dynamo.reset()
            result["checkpoint_GiB"] = checkpoint_GiB(model)
        with open(f"{args.json}.{args.variant}", "w") as f:
            json.dump(result, f)
        return
    import subprocess

    variants = ["bf16", *(v for v in args.variants if v != "bf16")]
    results = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--json", args.json, "--layers", str(args.layers)]
        flags = ["--no-save"] * args.no_save + (["--only", args.only] if args.only else [])
        proc = subprocess.run(cmd + flags)
        if proc.returncode == 0:  # one failing variant must not cost the others' figures
            with open(f"{args.json}.{variant}") as f:
                results[variant] = json.load(f)
        else:
            results[variant] = {"error": f"exit status {proc.returncode}"}
    b = results["bf16"]
    ratios = {v: _ratios(b, q) for v, q in results.items() if v != "bf16" and "error" not in q}
    out = {"env": env_info(), "date": time.strftime("%Y-%m-%d"), "layers": args.layers, "results": results,
           "speedup_vs_bf16": ratios, "wall_s": time.time() - t0}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    _print_table(b, results, ratios)
    print(f"wrote {args.json} ({time.time() - t0:.0f} s)")


def _ratios(b: dict, q: dict) -> dict:
    """Speed-ups of q over bf16 (prefill: latency ratio; decode: tokens/s ratio) and the weight-memory ratio."""
    return {
        "weight_memory": b["weight_GiB"] / q["weight_GiB"],
        **{k: b[k]["ms"] / q[k]["ms"] for k in b if k.startswith("prefill")},
        **{k: q[k]["tokens_per_s"] / b[k]["tokens_per_s"] for k in b if k.startswith("decode")},
        **{f"{k}_graph": q[k]["graph_tokens_per_s"] / b[k]["graph_tokens_per_s"] for k in b
           if k.startswith("decode") and "graph_tokens_per_s" in b[k] and "graph_tokens_per_s" in q[k]},
    }


def _print_table(b: dict, results: dict, ratios: dict) -> None:
    names = [v for v in ratios]
    print(f"\n{'metric':<26} {'bf16':>10}" + "".join(f" {v:>10} {'ratio':>7}" for v in names))
    rows = [("weights GiB", "weight_GiB", None, "weight_memory")]
    for k in b:
        if k.startswith("prefill"):
            rows.append((f"{k} ms", k, "ms", k))
        elif k.startswith("decode"):
            rows.append((f"{k} tok/s", k, "tokens_per_s", k))
            if all(f"{k}_graph" in r for r in ratios.values()):
                rows.append((f"{k} graph tok/s", k, "graph_tokens_per_s", f"{k}_graph"))
    for label, key, field, ratio_key in rows:
        line = f"{label:<26} {(b[key] if field is None else b[key][field]):>10.1f}"
        for v in names:
            q = results[v]
            line += f" {(q[key] if field is None else q[key][field]):>10.1f} {ratios[v][ratio_key]:>6.2f}x"
        print(line)


if __name__ == "__main__":
    main()
