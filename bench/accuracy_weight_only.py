"""AdaDim weight-only accuracy table: FP32 vs RTN / GPTQ with per-OC, per-IC and adaptive groups, in one run.

Every setting quantizes a fresh copy of the same float model; calibrated settings use the same WikiText-2
validation windows; all are scored on the same test windows (`hf_outliertune.evaluation`), so the rows are
directly comparable.

    python bench/accuracy_weight_only.py --data ../shared/data --json docs/accuracy_weight_only_cpu.json

Rows are independent, so a long table can run as one process per row (`--settings NAME --json part_i.json`,
side by side on one GPU) and be combined afterwards with `--merge part_*.json --json table.json`.
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

GRIDS = ((4, 64), (3, 64), (3, 128))  # (bits, group size); 576 = 4·128 + 64, so g128 has a ragged last group
ALGORITHMS = ("rtn", "gptq")
LAYOUTS = ("oc", "ic", "adaptive")


def setting_name(bits: int, group_size: int, algorithm: str, layout: str) -> str:
    return f"W{bits} g{group_size} {algorithm.upper()} {'per-' + layout.upper() if layout != 'adaptive' else 'AdaDim'}"


SETTINGS: dict[str, dict[str, Any]] = {
    setting_name(b, g, a, d): dict(weight_bits=b, group_size=g, weight_algorithm=a, group_dim=d)
    for b, g in GRIDS for a in ALGORITHMS for d in LAYOUTS
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), help="subset of the table rows")
    parser.add_argument("--num-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--gptq-damp", type=float, default=0.01)
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--json", default="accuracy_weight_only.json")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--merge", nargs="+", metavar="JSON", help="combine reports of earlier runs; runs nothing")
    args = parser.parse_args()
    if args.merge:
        report = merge_reports(args.merge)
        _print_table(report["rows"])
        print("\n".join(report["targets"]))
        _write(args.json, report)
        print(f"wrote {args.json}")
        return
    unknown = set(args.settings) - set(SETTINGS)
    if unknown:
        parser.error(f"unknown settings {sorted(unknown)}; choose from {list(SETTINGS)}")

    torch.manual_seed(0)
    texts = {"wikitext2": _read(args.data, "wikitext-2-raw/wiki.test.raw"), "ptb": _read(args.data, "ptb/ptb.test.txt")}
    calib = _read(args.data, "wikitext-2-raw/wiki.valid.raw")
    model, tokenizer = load_float_model(args.model)
    model = model.to(args.device)
    rows = [_row("FP32", model, tokenizer, texts, args.max_windows, {}, 0.0, None)]
    _print_table(rows)
    report = {
        "model": args.model or DEFAULT_MODEL_NAME,
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "calibration": f"WikiText-2 validation, {args.num_samples} x {args.seq_len} tokens (not used by data-free RTN)",
        "eval": f"first {args.max_windows} windows of 512 tokens of each test split, no BOS",
        "gptq_damp": args.gptq_damp,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "hf_outliertune": hf_outliertune.__version__, "python": platform.python_version()},
        "rows": rows,
    }
    for name in args.settings:
        quantized = copy.deepcopy(model)
        cfg = hf_outliertune.OutlierTuneConfig(
            act_bits=None, dataset=[calib], num_samples=args.num_samples, seq_len=args.seq_len,
            gptq_damp=args.gptq_damp, **SETTINGS[name],
        )
        start = time.perf_counter()
        hf_outliertune.quantize(quantized, cfg, tokenizer)
        seconds = time.perf_counter() - start
        rows.append(_row(name, quantized, tokenizer, texts, args.max_windows, SETTINGS[name], seconds,
                         cfg.module_formats))
        _print_table(rows)
        _write(args.json, report)  # after every row: a long run keeps what it measured
        del quantized
    print("\n".join(check_targets(rows)))
    report["targets"] = check_targets(rows)
    _write(args.json, report)
    print(f"wrote {args.json}")


def merge_reports(paths: list[str]) -> dict[str, Any]:
    """One report from several runs of this script: the first run's header and FP32 row, every other row once,
    in table order. Refuses runs of different models, evaluations or calibrations (their rows don't compare)."""
    reports = []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    first = reports[0]
    for path, other in zip(paths, reports):
        for key in ("model", "eval", "calibration", "gptq_damp"):
            if other.get(key) != first.get(key):
                raise SystemExit(f"{path}: {key} {other.get(key)!r} differs from {paths[0]}'s {first.get(key)!r}; "
                                 "merge only runs made with the same options")
    rows = {r["setting"]: r for report in reports for r in report["rows"] if r["setting"] != "FP32"}
    order = list(SETTINGS)
    merged = dict(first, merged_from=[os.path.basename(p) for p in paths])
    merged["rows"] = [first["rows"][0]] + sorted(rows.values(), key=lambda r: order.index(r["setting"]))
    merged["targets"] = check_targets(merged["rows"])
    return merged


def _read(root: str, rel: str) -> str:
    with open(os.path.join(root, rel), encoding="utf-8") as f:
        return f.read()


def _write(path: str, report: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)


def _row(name, model, tokenizer, texts, max_windows, setting, quant_seconds, formats) -> dict[str, Any]:
    row: dict[str, Any] = {"setting": name, "config": setting, "quantize_seconds": round(quant_seconds, 1)}
    if formats is not None:
        row["per_ic_layers"] = sorted(n for n, f in formats.items() if f["group_dim"] == "ic")
        row["n_layers"] = len(formats)
        if setting.get("group_dim") == "adaptive":
            row["criterion"] = {n: f["criterion"] for n, f in formats.items()}
    for key, text in texts.items():
        row[key] = perplexity(model, tokenizer, text, 512, max_windows, desc=f"{name} {key}").perplexity
    return row


def _print_table(rows: list[dict[str, Any]]) -> None:
    base = rows[0]
    print("\n| setting | WikiText-2 ppl | ×FP32 | PTB ppl | ×FP32 | per-IC layers | quantize s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        ic = f"{len(r['per_ic_layers'])}/{r['n_layers']}" if "per_ic_layers" in r else ""
        print(f"| {r['setting']} | {r['wikitext2']:.3f} | {r['wikitext2'] / base['wikitext2']:.3f} | {r['ptb']:.3f} | "
              f"{r['ptb'] / base['ptb']:.3f} | {ic} | {r['quantize_seconds']} |")
    print(flush=True)


def check_targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets, each as a line 'MET' / 'MISSED' with the figures."""
    by_name = {r["setting"]: r for r in rows}
    fp = by_name["FP32"]
    lines = []
    for b, g in GRIDS:
        for a in ALGORITHMS:
            names = [setting_name(b, g, a, d) for d in LAYOUTS]
            if not all(n in by_name for n in names):
                continue
            oc, ic, ada = (by_name[n] for n in names)
            for key in ("wikitext2", "ptb"):
                ok = ada[key] <= min(oc[key], ic[key])
                lines.append(f"{'MET' if ok else 'MISSED'}: {names[2]} {key} {ada[key]:.3f} <= min(per-OC "
                             f"{oc[key]:.3f}, per-IC {ic[key]:.3f})")
    for b, bound in ((4, 1.08), (3, 1.35)):
        name = setting_name(b, 64, "gptq", "adaptive")
        if name in by_name:
            ratio = by_name[name]["wikitext2"] / fp["wikitext2"]
            lines.append(f"{'MET' if ratio <= bound else 'MISSED'}: {name} WikiText-2 ×{ratio:.3f} <= ×{bound}")
    name, oc_name = setting_name(3, 64, "gptq", "adaptive"), setting_name(3, 64, "gptq", "oc")
    if name in by_name and oc_name in by_name:
        for key in ("wikitext2", "ptb"):
            ok = by_name[name][key] < by_name[oc_name][key]
            lines.append(f"{'MET' if ok else 'MISSED'}: {name} {key} {by_name[name][key]:.3f} < GPTQ per-OC "
                         f"{by_name[oc_name][key]:.3f}")
    return lines


if __name__ == "__main__":
    main()
