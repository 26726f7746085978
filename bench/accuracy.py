"""Accuracy table: FP32 vs OutlierTune and its baselines on one real model, in one run.

Every setting quantizes a fresh copy of the same float model, calibrated on the same WikiText-2
validation windows, and is scored on the same test windows, so the rows are directly comparable.

    python bench/accuracy.py --data ../shared/data --json docs/accuracy.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from datetime import date
from typing import Any

import torch
import transformers

import hf_outliertune
from hf_outliertune.evaluation import perplexity
from hf_outliertune.models import DEFAULT_MODEL_NAME, load_float_model

# Baselines keep this package's weight quantizer (GPTQ on quantized inputs), so rows differ only in how
# activations are handled; "plain" rows switch off the o_proj/down_proj migration and rotation.
_PLAIN = dict(migration_alpha=None, rotate_dynamic=False)
SETTINGS: dict[str, dict[str, Any]] = {
    "W8A8 OutlierTune": dict(weight_bits=8, act_bits=8),
    "W8A8 OutlierTune + W8 embeddings/lm_head": dict(weight_bits=8, act_bits=8, embedding_bits=8),
    "W8A8 OutlierTune + W4 embeddings/lm_head": dict(weight_bits=8, act_bits=8, embedding_bits=4),
    "W8A8 OutlierTune, static o/down_proj inputs": dict(weight_bits=8, act_bits=8, non_norm_activations="static"),
    "W8A8 per-token (no folding)": dict(weight_bits=8, act_bits=8, activation_scheme="per_token", **_PLAIN),
    "W8A8 SmoothQuant a=0.5": dict(weight_bits=8, act_bits=8, activation_scheme="smoothquant", **_PLAIN),
    "W6A6 OutlierTune": dict(weight_bits=6, act_bits=6),
    "W6A6 OutlierTune, no symmetrization": dict(weight_bits=6, act_bits=6, symmetrize=False),
    "W6A6 OutlierTune, plain (absmax W, no migration/rotation)": dict(
        weight_bits=6, act_bits=6, weight_algorithm="absmax", **_PLAIN
    ),
    "W6A6 per-token (no folding)": dict(weight_bits=6, act_bits=6, activation_scheme="per_token", **_PLAIN),
    "W6A6 SmoothQuant a=0.5": dict(weight_bits=6, act_bits=6, activation_scheme="smoothquant", **_PLAIN),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="subset of the table rows")
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--json", default="accuracy.json")
    parser.add_argument("--device", default="cpu", help="cpu (the reference integer path) or cuda")
    args = parser.parse_args()

    torch.manual_seed(0)
    texts = {
        "wikitext2": _read(args.data, "wikitext-2-raw/wiki.test.raw"),
        "ptb": _read(args.data, "ptb/ptb.test.txt"),
    }
    calib = _read(args.data, "wikitext-2-raw/wiki.valid.raw")
    model, tokenizer = load_float_model(args.model)
    model = model.to(args.device)
    rows = [_row("FP32", model, tokenizer, texts, args.max_windows, {}, 0.0)]
    _print_table(rows)
    for name in args.settings:
        quantized = copy.deepcopy(model)
        cfg = hf_outliertune.OutlierTuneConfig(
            dataset=[calib], num_samples=args.num_samples, seq_len=args.seq_len, **SETTINGS[name]
        )
        start = time.perf_counter()
        hf_outliertune.quantize(quantized, cfg, tokenizer)
        rows.append(_row(name, quantized, tokenizer, texts, args.max_windows, SETTINGS[name], time.perf_counter() - start))
        _print_table(rows)
        del quantized
    report = {
        "model": args.model or DEFAULT_MODEL_NAME,
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "calibration": f"WikiText-2 validation, {args.num_samples} x {args.seq_len} tokens",
        "eval": f"first {args.max_windows} windows of 512 tokens of each test split, no BOS",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_outliertune": hf_outliertune.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.json}")


def _read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def _row(name, model, tokenizer, texts, max_windows, setting, quant_seconds) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": name, "config": setting, "quantize_seconds": round(quant_seconds, 1)}
    for key, text in texts.items():
        row[key] = perplexity(model, tokenizer, text, 512, max_windows, desc=f"{name} {key}").perplexity
    return row


def _print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print("\n| setting | WikiText-2 ppl | vs FP32 | PTB ppl | vs FP32 | quantize s |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        wk = f"{100 * (r['wikitext2'] / base['wikitext2'] - 1):+.2f} %"
        pt = f"{100 * (r['ptb'] / base['ptb'] - 1):+.2f} %"
        print(f"| {r['setting']} | {r['wikitext2']:.3f} | {wk} | {r['ptb']:.3f} | {pt} | {r['quantize_seconds']} |")
    print(flush=True)


if __name__ == "__main__":
    main()
