"""LoRA fine-tuning of SmolLM2-135M-Instruct on WikiText-2 validation text: float base vs W8A8 and W4 bases.

One mode per process, so the peak memory measured is that mode's own; each run adds its row to the JSON file
and prints the table of every row the file holds (the record in docs/finetuning.md):

    python bench/finetune.py --mode fp32 --json docs/finetune_cpu.json
    python bench/finetune.py --mode w8a8 --json docs/finetune_cpu.json --cache /tmp/ft_cache
    python bench/finetune.py --mode w4   --json docs/finetune_cpu.json --cache /tmp/ft_cache
    python bench/finetune.py --table --json docs/finetune_cpu.json   # print the table only

The defaults are the settings of the recorded CPU run (one thread: on shared cores two threads were far slower).

Every mode trains the same LoRA (same targets, rank, data order, schedule) with the transformers `Trainer`;
perplexity is the package protocol (first `--eval-windows` windows of 512 tokens of WikiText-2 test), measured
before training, after training (adapter unmerged), and for quantized bases after `merge_and_unload`.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import time
from datetime import date
from typing import Any

import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

import hf_outliertune
from hf_outliertune.evaluation import perplexity
from hf_outliertune.models import DEFAULT_MODEL_NAME, load_float_model
from hf_outliertune.training import prepare_model_for_training

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODES: dict[str, dict[str, Any] | None] = {
    "fp32": None,
    "w8a8": dict(weight_bits=8, act_bits=8),
    # RTN: AdaDim's GPTQ took 18 min on the shared 2-core CPU; the adaptive layout choice still runs
    "w4": dict(act_bits=None, weight_bits=4, group_size=64, group_dim="adaptive", weight_algorithm="rtn"),
}
DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (forward, backward, update)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._start)


def reset_peak_rss() -> bool:
    """Return freed heap to the OS, then reset this process's resident-set high-water mark (Linux; False if
    unsupported), so the next peak counts live memory only."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_mb(key: str) -> float:
    """`VmRSS` (resident now) or `VmHWM` (peak since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def tensor_mb(model: torch.nn.Module) -> float:
    """Bytes of every parameter and buffer (tied tensors once), in MiB."""
    seen = {t.data_ptr(): t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()]}
    return sum(seen.values()) / 2**20


def read_text(data_dir: str, rel: str) -> str:
    with open(os.path.join(data_dir, rel), encoding="utf-8") as f:
        return f.read()


def build_model(
    mode: str, calib: str, calib_samples: int, cache: str | None
) -> tuple[torch.nn.Module, Any, float | None]:
    """The float SmolLM2, quantized in place unless mode is fp32, or the quantized checkpoint saved in
    `cache/mode` by an earlier run; returns (model, tokenizer, quantize seconds or None when loaded)."""
    saved = os.path.join(cache, mode) if cache and MODES[mode] is not None else None
    if saved and os.path.isdir(saved):
        model = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(saved), None
    model, tokenizer = load_float_model()
    if MODES[mode] is None:
        return model, tokenizer, 0.0
    cfg = hf_outliertune.OutlierTuneConfig(dataset=[calib], num_samples=calib_samples, seq_len=512, **MODES[mode])
    start = time.perf_counter()
    hf_outliertune.quantize(model, cfg, tokenizer)
    seconds = time.perf_counter() - start
    if saved:
        model.save_pretrained(saved)
        tokenizer.save_pretrained(saved)
    return model, tokenizer, seconds


def train_windows(tokenizer: Any, text: str, seq_len: int) -> list[dict[str, torch.Tensor]]:
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    windows = ids[: ids.numel() // seq_len * seq_len].view(-1, seq_len)
    return [{"input_ids": w, "labels": w} for w in windows]


def run(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    test = read_text(args.data, "wikitext-2-raw/wiki.test.raw")
    valid = read_text(args.data, "wikitext-2-raw/wiki.valid.raw")
    model, tokenizer, quantize_s = build_model(mode, valid, args.calib_samples, args.cache)
    base_mb = tensor_mb(model)

    def ppl(m: torch.nn.Module, desc: str) -> float:
        m.eval()
        start = time.perf_counter()
        value = perplexity(m, tokenizer, test, max_windows=args.eval_windows, desc=desc).perplexity
        print(f"[{mode}] {desc}: ppl {value:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
        return value

    ppl_before = ppl(model, "before")
    if MODES[mode] is None:
        for p in model.parameters():
            p.requires_grad_(False)
        if args.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model = prepare_model_for_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    lora = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lora)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    training_args = TrainingArguments(
        output_dir=os.path.join(args.workdir, mode), max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=args.steps // 10, weight_decay=0.0,
        logging_steps=args.log_every, report_to=[], save_strategy="no", use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=False,
    )
    timer = StepTimer()
    trainer = Trainer(model=peft_model, args=training_args, callbacks=[timer],
                      train_dataset=train_windows(tokenizer, valid, args.seq_len))
    rss_reset = reset_peak_rss()
    start_mb = rss_mb("VmRSS")
    result = trainer.train()
    peak_mb = rss_mb("VmHWM") if rss_reset else float("nan")
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    peft_model.save_pretrained(os.path.join(args.workdir, mode, "adapter"))
    ppl_after = ppl(peft_model, "after")
    ppl_merged = None
    if MODES[mode] is not None:
        ppl_merged = ppl(peft_model.merge_and_unload(), "merged")
    return {
        "mode": mode,
        "config": MODES[mode],
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "rank": args.rank,
        "gradient_checkpointing": args.gradient_checkpointing,
        "trainable_params": trainable,
        "quantize_s": None if quantize_s is None else round(quantize_s, 1),
        "base_model_mb": round(base_mb, 1),
        "rss_train_start_mb": round(start_mb, 1),
        "peak_rss_train_mb": round(peak_mb, 1),
        "step_s_median": round(statistics.median(timer.times[1:]), 3),
        "train_runtime_s": round(result.metrics["train_runtime"], 1),
        "loss_curve": curve,
        "ppl_before": round(ppl_before, 3),
        "ppl_after": round(ppl_after, 3),
        "ppl_merged": None if ppl_merged is None else round(ppl_merged, 3),
        "eval_windows": args.eval_windows,
        "calib_samples": args.calib_samples if MODES[mode] is not None else None,
        "load_average_1min_end": round(os.getloadavg()[0], 2),
    }


def remeasure_merge(mode: str, args: argparse.Namespace) -> float:
    """WikiText-2 ppl after `merge_and_unload` of the adapter a finished run saved (cached quantized base)."""
    from peft import PeftModel

    saved = os.path.join(args.cache or "", mode)
    if MODES[mode] is None or not os.path.isdir(saved):
        raise SystemExit(f"--merge-only needs a quantized mode whose checkpoint is in --cache (no {saved}).")
    base = AutoModelForCausalLM.from_pretrained(saved, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, os.path.join(args.workdir, mode, "adapter")).merge_and_unload()
    text = read_text(args.data, "wikitext-2-raw/wiki.test.raw")
    tokenizer = AutoTokenizer.from_pretrained(saved)
    return perplexity(model.eval(), tokenizer, text, max_windows=args.eval_windows).perplexity


def mean_loss(curve: list, first: bool, n: int = 3) -> float:
    losses = [loss for _, loss in curve]
    part = losses[:n] if first else losses[-n:]
    return sum(part) / len(part)


def print_table(report: dict[str, Any]) -> None:
    rows = report["runs"]
    base = rows.get("fp32")
    print(f"\n{report['model']} — LoRA on WikiText-2 validation, {report['device']}, torch {report['torch']}\n")
    print("| base | train loss first→last | WikiText-2 ppl before | after (adapter) | after merge | "
          "step s (median) | ×fp32 | base tensors MiB | RSS at start MiB | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, r in rows.items():
        ratio = f"{r['step_s_median'] / base['step_s_median']:.2f}" if base else "-"
        merged = "-" if r["ppl_merged"] is None else f"{r['ppl_merged']:.3f}"
        print(f"| {mode} | {mean_loss(r['loss_curve'], True):.3f} → {mean_loss(r['loss_curve'], False):.3f} | "
              f"{r['ppl_before']:.3f} | {r['ppl_after']:.3f} | {merged} | {r['step_s_median']:.2f} | {ratio} | "
              f"{r['base_model_mb']:.0f} | {r['rss_train_start_mb']:.0f} | {r['peak_rss_train_mb']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=list(MODES), help="which base model to fine-tune (one per process)")
    parser.add_argument("--table", action="store_true", help="only print the table of --json")
    parser.add_argument("--merge-only", action="store_true",
                        help="re-measure only the merged ppl of --mode from its saved adapter (after a merge change)")
    parser.add_argument("--json", default="finetune.json")
    parser.add_argument("--data", default=DATA_DIR, help="folder holding wikitext-2-raw/")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--eval-windows", type=int, default=16, help="the package protocol uses 40")
    parser.add_argument("--calib-samples", type=int, default=16, help="calibration windows of 512 tokens")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=os.path.join("/tmp", "hf_outliertune_finetune"))
    parser.add_argument("--cache", default=None, help="folder for the quantized checkpoints (reused when present)")
    args = parser.parse_args()
    if not args.table and args.mode is None:
        parser.error("pass --mode fp32|w8a8|w4 (or --table)")

    report: dict[str, Any] = {"runs": {}}
    if os.path.exists(args.json):
        with open(args.json) as f:
            report = json.load(f)
    if not args.table:
        torch.set_num_threads(args.threads)
        report.update(
            model=DEFAULT_MODEL_NAME, date=date.today().isoformat(), device=f"CPU ({platform.processor() or 'cpu'}, "
            f"{args.threads} threads)", torch=torch.__version__, transformers=transformers.__version__,
        )
        if args.merge_only:
            row = report["runs"][args.mode]
            row["ppl_merged"] = round(remeasure_merge(args.mode, args), 3)
            row["merge_remeasured"] = date.today().isoformat()
        else:
            report["runs"][args.mode] = run(args.mode, args)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print_table(report)


if __name__ == "__main__":
    main()
