"""`hf-outliertune`: quantize a causal LM with OutlierTune and measure its perplexity from the command line.

    hf-outliertune quantize --calib wiki.valid.raw --eval wiki.test.raw   # the embedded SmolLM2
    hf-outliertune quantize --model DIR_OR_ID_OR_GGUF --calib FILE --output OUT_DIR
    hf-outliertune eval --model OUT_DIR --text wiki.test.raw
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from typing import Any, Callable, Sequence

import torch

from . import __version__, quantize
from .config import (
    ACT_BITS,
    ACT_CLIPS,
    ACTIVATION_SCHEMES,
    EMBEDDING_BITS,
    GROUP_DIMS,
    NON_NORM_ACTIVATIONS,
    WEIGHT_ALGORITHMS,
    WEIGHT_BITS,
    WEIGHT_CLIPS,
    WEIGHT_ONLY_BITS,
    OutlierTuneConfig,
)
from .evaluation import PerplexityResult, perplexity
from .hub import push_quantized, save_quantized
from .model_card import CardInputs
from .models import DEFAULT_MODEL_NAME, default_model_path, load_float_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Sized for a first run on a few CPU cores; pass larger values for paper-grade numbers.
DEFAULT_NUM_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_MAX_WINDOWS = 40
_CONFIG_DEFAULTS = inspect.signature(OutlierTuneConfig.__init__).parameters


def _config_default(name: str) -> Any:
    """The default of an `OutlierTuneConfig` argument, so the CLI and the library agree."""
    return _CONFIG_DEFAULTS[name].default


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type` accepting integers >= `minimum`."""

    def convert(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            number = minimum - 1
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} is not an integer >= {minimum}")
        return number

    return convert


def optional_fraction(value: str) -> float | None:
    """An argparse `type` for a number in [0, 1] or `none`."""
    if value.lower() == "none":
        return None
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number in [0, 1] or 'none'")
    return number


def optional_act_bits(value: str) -> int | None:
    """An argparse `type` for --act-bits: one of `ACT_BITS`, or `none` (weight-only quantization)."""
    if value.lower() == "none":
        return None
    if value not in [str(b) for b in ACT_BITS]:
        raise argparse.ArgumentTypeError(f"{value!r} is not one of {list(ACT_BITS)} or 'none'")
    return int(value)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    """--model and --dtype, shared by both subcommands."""
    parser.add_argument("--model", metavar="ID_OR_PATH_OR_GGUF",
                        help=f"Hub id, local model directory or .gguf file (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="dtype to load the model in (default: %(default)s)")


def _add_report_args(parser: argparse.ArgumentParser) -> None:
    """--max-windows and --json, shared by both subcommands."""
    parser.add_argument("--max-windows", type=int_at_least(1), default=DEFAULT_MAX_WINDOWS, metavar="N",
                        help="evaluate at most N perplexity windows (default: %(default)s)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures to this JSON file")


def _add_quantize_parser(subparsers: Any) -> None:
    """The `quantize` subcommand."""
    p = subparsers.add_parser("quantize", help="calibrate and quantize a float model, optionally save and evaluate it")
    _add_model_args(p)
    p.add_argument("--calib", nargs="+", metavar="FILE",
                   help="calibration text file(s) (default: the --eval file, if given)")
    p.add_argument("--weight-bits", type=int, choices=sorted({*WEIGHT_BITS, *WEIGHT_ONLY_BITS}),
                   default=_config_default("weight_bits"),
                   help=f"weight grid bits: {list(WEIGHT_BITS)} with --act-bits 8/6, {list(WEIGHT_ONLY_BITS)} with "
                        "--act-bits none (default: %(default)s)")
    p.add_argument("--act-bits", type=optional_act_bits, default=_config_default("act_bits"), metavar="8|6|none",
                   help="activation grid bits, or none for weight-only AdaDim quantization (default: %(default)s)")
    p.add_argument("--group-size", type=int, metavar="G",
                   help="weight-only: values per group, a power of two in [16, 1024] (default: 128)")
    p.add_argument("--group-dim", choices=GROUP_DIMS,
                   help="weight-only: groups along input channels of a row (oc), output channels of a column (ic), "
                        "or chosen per layer (adaptive, default)")
    p.add_argument("--weight-clip", choices=WEIGHT_CLIPS,
                   help="weight-only: MSE-searched clip of each group's range (mse, default) or its full range "
                        "(minmax; with rtn and a fixed --group-dim this needs no calibration data)")
    p.add_argument("--refit-rounds", type=int, metavar="R",
                   help="weight-only: rounds of least-squares refit of the group scales and zeros to the codes "
                        "(default: 2; 0 for rtn with a fixed --group-dim and minmax clip, which stays data-free)")
    p.add_argument("--embedding-bits", type=int, choices=list(EMBEDDING_BITS),
                   help="also store the token embeddings and the lm_head as weight-only codes of this many bits "
                        "(default: keep them in floating point)")
    p.add_argument("--no-act-order", action="store_true",
                   help="weight-only GPTQ: visit input channels in order instead of by decreasing Hessian diagonal")
    p.add_argument("--no-symmetrize", action="store_true",
                   help="do not shift norm-fed channels by the midpoint of their calibrated range")
    p.add_argument("--activation-scheme", choices=ACTIVATION_SCHEMES, default=_config_default("activation_scheme"),
                   help="outliertune, or a smoothquant / per_token baseline (default: %(default)s)")
    p.add_argument("--weight-algorithm", "--algorithm", choices=WEIGHT_ALGORITHMS, default=_config_default("weight_algorithm"),
                   help="weight rounding: absmax/mse/gptq with --act-bits 8/6, rtn/gptq weight-only "
                        "(default: %(default)s)")
    p.add_argument("--act-clip", choices=ACT_CLIPS, default=_config_default("act_clip"),
                   help="static activation range: raw max or MSE-searched clip (default: %(default)s)")
    p.add_argument("--non-norm-activations", choices=NON_NORM_ACTIVATIONS,
                   default=_config_default("non_norm_activations"),
                   help="o_proj/down_proj inputs: dynamic per-token or static per-channel (default: %(default)s)")
    p.add_argument("--migration-alpha", type=optional_fraction, default=_config_default("migration_alpha"),
                   metavar="A|none", help="SmoothQuant-style migration into v_proj/up_proj rows (default: %(default)s)")
    p.add_argument("--no-rotate", action="store_true",
                   help="no block-Hadamard rotation of the per-token-quantized inputs")
    p.add_argument("--gptq-damp", type=float, default=_config_default("gptq_damp"),
                   help="GPTQ damping, fraction of the mean Hessian diagonal (default: 0.1 with activation "
                        "quantization, 0.01 weight-only)")
    p.add_argument("--no-gptq-quantized-inputs", action="store_true",
                   help="run GPTQ on float inputs instead of the quantized inputs the layer will see")
    p.add_argument("--num-samples", type=int_at_least(1), default=DEFAULT_NUM_SAMPLES, metavar="N",
                   help="calibration sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int_at_least(2), default=DEFAULT_SEQ_LEN, metavar="N",
                   help="tokens per calibration sequence (default: %(default)s)")
    p.add_argument("--output", metavar="DIR", help="save the quantized model, tokenizer and model card to DIR")
    p.add_argument("--push-to-hub", metavar="REPO_ID",
                   help="upload the quantized model, tokenizer and model card to this Hub repository (one commit)")
    p.add_argument("--hub-revision", metavar="BRANCH", help="branch to push to (default: main; created if missing)")
    p.add_argument("--private", action="store_true", help="create the Hub repository as private")
    p.add_argument("--base-model", metavar="HUB_ID",
                   help="Hub id of the quantized float model, for the model card when --model is a local path or GGUF")
    p.add_argument("--eval", metavar="FILE", help="text file to measure perplexity on, before and after quantizing")
    p.add_argument("--eval-seq-len", type=int_at_least(2), default=DEFAULT_SEQ_LEN, metavar="N",
                   help="tokens per perplexity window (default: %(default)s)")
    _add_report_args(p)
    p.set_defaults(func=run_quantize)


def _add_eval_parser(subparsers: Any) -> None:
    """The `eval` subcommand."""
    p = subparsers.add_parser("eval", help="perplexity of a float model or a saved hf-outliertune checkpoint")
    _add_model_args(p)
    p.add_argument("--text", required=True, metavar="FILE", help="text file to measure perplexity on")
    p.add_argument("--seq-len", type=int_at_least(2), default=DEFAULT_SEQ_LEN, metavar="N",
                   help="tokens per perplexity window (default: %(default)s)")
    _add_report_args(p)
    p.set_defaults(func=run_eval)


def build_parser() -> argparse.ArgumentParser:
    """The `hf-outliertune` argument parser."""
    parser = argparse.ArgumentParser(
        prog="hf-outliertune",
        description="OutlierTune W8A8/W6A6 post-training quantization for Hugging Face causal LMs.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{quantize,eval}")
    _add_quantize_parser(subparsers)
    _add_eval_parser(subparsers)
    return parser


def read_text(path: str, what: str) -> str:
    """The contents of a UTF-8 text file; `FileNotFoundError` naming its role when it is missing."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, encoding="utf-8") as f:
        return f.read()


def calibration_texts(args: argparse.Namespace) -> list[str]:
    """The --calib texts, else the --eval text (with a warning), else an error."""
    if args.calib:
        return [read_text(path, "calibration") for path in args.calib]
    if args.eval:
        print(f"note: no --calib given; calibrating on the --eval file {args.eval} (its perplexity is then "
              "optimistic)", file=sys.stderr)
        return [read_text(args.eval, "evaluation")]
    raise ValueError("no calibration text: pass --calib FILE")


def build_config(args: argparse.Namespace, texts: list[str]) -> OutlierTuneConfig:
    """An `OutlierTuneConfig` from the quantize flags (it validates them)."""
    return OutlierTuneConfig(
        weight_bits=args.weight_bits,
        act_bits=args.act_bits,
        symmetrize=not args.no_symmetrize,
        activation_scheme=args.activation_scheme,
        weight_algorithm=args.weight_algorithm,
        act_clip=args.act_clip,
        non_norm_activations=args.non_norm_activations,
        migration_alpha=args.migration_alpha,
        rotate_dynamic=not args.no_rotate,
        gptq_damp=args.gptq_damp,
        gptq_quantized_inputs=not args.no_gptq_quantized_inputs,
        group_size=args.group_size,
        group_dim=args.group_dim,
        weight_clip=args.weight_clip,
        refit_rounds=args.refit_rounds,
        act_order=not args.no_act_order,
        embedding_bits=args.embedding_bits,
        dataset=texts,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
    )


def describe_setting(config: Any) -> str:
    """A short label such as `W8A8 outliertune (gptq, mse clip, sym)`; `float` for an unquantized model."""
    if config is None:
        return "float"
    if not isinstance(config, OutlierTuneConfig):
        return str(getattr(config, "quant_method", type(config).__name__))
    if config.weight_only:
        details = [config.weight_algorithm, f"{config.weight_clip} clip"] + (
            [f"refit x{config.refit_rounds}"] if config.refit_rounds else []
        ) + (["no act-order"] if not config.act_order else [])
        return f"W{config.weight_bits} g{config.group_size} {config.group_dim} ({', '.join(details)}){_tables(config)}"
    details = [config.weight_algorithm]
    if config.uses_static_activations:
        details += [f"{config.act_clip} clip"] + (["sym"] if config.symmetrize else [])
    if config.non_norm_activations == "static":
        details.append("static o/down")
    else:
        details += (["rot"] if config.rotate_dynamic else []) + (
            [f"mig {config.migration_alpha}"] if config.migration_alpha is not None else []
        )
    return f"W{config.weight_bits}A{config.act_bits} {config.activation_scheme} ({', '.join(details)}){_tables(config)}"


def _tables(config: OutlierTuneConfig) -> str:
    return f", W{config.embedding_bits} embeddings + lm_head" if config.embedding_bits else ""


def model_label(source: str | None) -> str:
    """How a --model value is shown in tables: as given, or the embedded default's file name."""
    return source or os.path.basename(default_model_path())


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain left-aligned text table."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    lines = [headers, ["-" * w for w in widths], *rows]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def write_json(path: str | None, figures: dict[str, Any]) -> None:
    """Write `figures` to `path` when one was given."""
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(figures, f, indent=2)
        print(f"wrote {path}")


def _windows(result: PerplexityResult) -> str:
    """`windows × seq_len` of a perplexity result."""
    return f"{result.windows} × {result.seq_len}"


def run_quantize(args: argparse.Namespace) -> dict[str, Any]:
    """Load, (evaluate,) quantize, (evaluate, save); return the figures."""
    texts = calibration_texts(args)
    eval_text = read_text(args.eval, "evaluation") if args.eval else None
    config = build_config(args, texts)
    model_name = model_label(args.model)
    setting = describe_setting(config)
    print(f"model:       {args.model or DEFAULT_MODEL_NAME} ({args.dtype})")
    print(f"setting:     {setting}")
    print(f"calibration: {args.num_samples} × {args.seq_len} tokens from {len(texts)} text(s)")
    if eval_text is not None:
        print(f"evaluation:  up to {args.max_windows} × {args.eval_seq_len} tokens of {args.eval}")
    model, tokenizer = load_float_model(args.model, DTYPES[args.dtype])
    figures: dict[str, Any] = {"model": model_name, "setting": setting, "dtype": args.dtype}
    before = None
    if eval_text is not None:  # before quantizing: quantize() works in place
        before = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.max_windows,
                            desc="perplexity (float)")
    start = time.perf_counter()
    quantize(model, config, tokenizer)
    figures["quantize_seconds"] = round(time.perf_counter() - start, 1)
    print(f"quantized in {figures['quantize_seconds']} s")
    figures["config"] = {k: v for k, v in config.to_dict().items() if k != "module_formats"}
    if before is not None:
        after = perplexity(model, tokenizer, eval_text, args.eval_seq_len, args.max_windows,
                           desc="perplexity (quantized)")
        figures.update(ppl_float=before.as_dict(), ppl_quantized=after.as_dict(),
                       ratio=after.perplexity / before.perplexity)
        print(format_table(
            ["model", "setting", "ppl float", "ppl quantized", "ratio", "windows × seq_len"],
            [[model_name, setting, f"{before.perplexity:.3f}", f"{after.perplexity:.3f}",
              f"{figures['ratio']:.4f}", _windows(after)]],
        ))
    card = card_inputs(args, figures)
    if args.output:  # before a push, so a failed upload loses nothing
        save_quantized(model, args.output, tokenizer, card)
        figures["output"] = args.output
        print(f"saved the quantized model to {args.output}")
    if args.push_to_hub:
        info = push_quantized(model, args.push_to_hub, tokenizer, card, revision=args.hub_revision,
                              private=True if args.private else None)
        figures["hub"] = {"repo_id": info.repo_url.repo_id, "commit": info.oid, "url": info.commit_url}
        print(f"pushed to {info.repo_url.repo_id} (commit {info.oid})")
    return figures


def card_inputs(args: argparse.Namespace, figures: dict[str, Any]) -> CardInputs:
    """What the model card states beyond the config: base model, calibration and evaluation files, measurements."""
    source = args.model or default_model_path()
    calib = args.calib or ([args.eval] if args.eval else [])
    measured = "ppl_quantized" in figures
    return CardInputs(
        base_model=args.base_model or source,
        base_source=source if args.base_model else None,
        calibration_data=", ".join(f"`{os.path.basename(path)}`" for path in calib) or None,
        evaluation=figures if measured else None,
        eval_data=f"`{os.path.basename(args.eval)}`" if measured else None,
    )


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    """Perplexity of one model on --text; return the figures."""
    text = read_text(args.text, "text")
    model_name = model_label(args.model)
    model, tokenizer = load_float_model(args.model, DTYPES[args.dtype])
    setting = describe_setting(getattr(model.config, "quantization_config", None))
    result = perplexity(model, tokenizer, text, args.seq_len, args.max_windows)
    print(format_table(["model", "setting", "ppl", "windows × seq_len"],
                       [[model_name, setting, f"{result.perplexity:.3f}", _windows(result)]]))
    return {"model": model_name, "setting": setting, "dtype": args.dtype, "ppl": result.as_dict()}


def check_bit_widths(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse a --weight-bits the --act-bits mode does not offer as a usage error (exit code 2)."""
    allowed = WEIGHT_ONLY_BITS if args.act_bits is None else WEIGHT_BITS
    if args.weight_bits not in allowed:
        hint = "" if args.act_bits is None else "; for weight-only quantization pass --act-bits none"
        parser.error(f"--weight-bits {args.weight_bits} is not available with --act-bits "
                     f"{'none' if args.act_bits is None else args.act_bits}: choose from {list(allowed)}{hint}")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hf-outliertune` and `python -m hf_outliertune`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "quantize":
        check_bit_widths(parser, args)
    try:
        write_json(args.json, args.func(args))
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0
