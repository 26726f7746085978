"""The `README.md` model card of a quantized checkpoint, rendered from `model_cards/` with `huggingface_hub.ModelCard`.

Everything on the card comes from the saved quantization config (`config.to_dict()`, both the W8A8/W6A6 and
the weight-only mode), from the files written, or from `CardInputs` the caller passes: measured perplexities
are shown only when given (the `hf-outliertune quantize --json` figures), never estimated; the license and
language are carried from the base model's own card or GGUF metadata; unknown fields are left out of the
metadata and shown as "not measured" / "not recorded" in the text.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

TEMPLATE = "outliertune_template.md"
PAPERS = {
    "outliertune": "[OutlierTune](https://arxiv.org/abs/2406.18832)",
    "adadim": "[AdaDim](https://arxiv.org/abs/2309.15531)",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class CardInputs:
    """What the card states beyond the quantization config; `None` means unknown.

    Args:
        repo_id: the Hub repository the checkpoint is pushed to (used in the usage snippet and the title).
        base_model: what was quantized: a Hub id, a local directory or a `.gguf` file. A Hub id also goes into
            the `base_model` metadata (the Hub then lists this repo as a quantization of it).
        base_source: the local directory or `.gguf` file the float weights were actually loaded from, when
            `base_model` is a Hub id naming the same model (shown on the card; license and language read from it).
        license: Hub license id; default: the base model's (its README metadata or GGUF `general.license`).
        calibration_data: where the calibration text came from (e.g. file names); sizes come from the config.
        datasets: Hub dataset ids of the calibration / evaluation data, for the metadata.
        evaluation: measured perplexities as written by `hf-outliertune quantize --json`: `ppl_quantized`
            and optionally `ppl_float`, each `{"perplexity", "windows", "seq_len", ...}`.
        eval_data: which text `evaluation` was measured on.
        tags: extra Hub tags.
    """

    repo_id: str | None = None
    base_model: str | None = None
    base_source: str | None = None
    license: str | None = None
    calibration_data: str | None = None
    datasets: list[str] | None = None
    evaluation: dict[str, Any] | None = None
    eval_data: str | None = None
    tags: list[str] = field(default_factory=list)


def is_hub_id(name: str | None) -> bool:
    """True for an `org/name` string that is not an existing local path."""
    return bool(name) and bool(_HUB_ID.match(name)) and not os.path.exists(name)


def scheme_label(qc: dict[str, Any]) -> str:
    """`W8A8`, `W6A6`, or `W4A16` for weight-only (activations stay 16/32-bit floats)."""
    return f"W{qc['weight_bits']}A16" if qc.get("act_bits") is None else f"W{qc['weight_bits']}A{qc['act_bits']}"


def method_name(qc: dict[str, Any]) -> str:
    """`adadim` for the weight-only mode, else the activation scheme (`outliertune`, `smoothquant`, ...)."""
    return "adadim" if qc.get("act_bits") is None else str(qc.get("activation_scheme", "outliertune"))


def _formats(qc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    formats = qc.get("module_formats")
    if not isinstance(formats, dict) or not formats:
        raise ValueError(
            "The quantization config has no module_formats: the model was not quantized by hf-outliertune "
            "(quantize it first, or load a checkpoint saved by hf-outliertune)."
        )
    return formats


def quantization_rows(qc: dict[str, Any], calibration_source: str | None = None) -> list[tuple[str, str]]:
    """(field, value) rows of the card's quantization table, from the config dict and the calibration source."""
    all_formats = _formats(qc)
    formats = {name: fmt for name, fmt in all_formats.items() if "table" not in fmt}  # the decoder's linears
    tables = {name: fmt for name, fmt in all_formats.items() if "table" in fmt}
    acts = Counter(fmt.get("act") for fmt in formats.values())
    n_quant = sum(n for act, n in acts.items() if act != "float")
    algorithm = qc.get("weight_algorithm")
    if qc.get("act_bits") is None:
        dims = Counter(fmt.get("group_dim") for fmt in formats.values() if fmt.get("act") == "none")
        layout = {"oc": "per output channel (groups of consecutive input channels)",
                  "ic": "per input channel (groups of consecutive output channels)"}
        if qc.get("group_dim") == "adaptive":
            where = f"AdaDim adaptive: per-IC in {dims['ic']} and per-OC in {dims['oc']} of {n_quant} linears"
        else:
            where = layout.get(qc.get("group_dim"), str(qc.get("group_dim")))
        rows = [
            ("Method", f"{PAPERS['adadim']} weight-only, {algorithm}"
                       + (" with act-order" if qc.get("act_order") and algorithm == "gptq" else "")),
            ("Weights", f"{qc['weight_bits']}-bit asymmetric, groups of {qc.get('group_size')}: {where}; "
                        f"{qc.get('weight_clip')} range"
                        + (f", scales and zeros refitted to the output error ({qc['refit_rounds']} rounds)"
                           if qc.get("refit_rounds") else "")
                        + "; fp16 scale and zero point per group, codes packed in int32"),
            ("Activations", "not quantized (the model's floating-point dtype)"),
        ]
    else:
        scheme = method_name(qc)
        details = []
        if scheme == "outliertune":  # the static per-channel path; the baselines have none of these
            details += [f"symmetrization {'on' if qc.get('symmetrize') else 'off'}", f"{qc.get('act_clip')} clip"]
        if qc.get("non_norm_activations") == "static":
            details.append("static per-channel steps on the non-norm inputs too")
        else:
            details.append("block-Hadamard rotation" if qc.get("rotate_dynamic") else "no rotation")
            if qc.get("migration_alpha") is not None:
                details.append(f"migration alpha {qc['migration_alpha']}")
        rows = [
            ("Method", f"{PAPERS.get(scheme, scheme)} ({', '.join(details)})"),
            ("Weights", f"{qc['weight_bits']}-bit symmetric per output channel, {algorithm}; int8 storage, fp32 "
                        "scale per output channel"),
            ("Activations", f"{qc['act_bits']}-bit: static per-channel steps on {acts['static']} linears, dynamic "
                            f"per-token on {acts['dynamic']}"),
        ]
    kept = (["embeddings", "lm_head"] if not tables else []) + ["norms"] + list(qc.get("modules_to_not_convert") or [])
    if tables:
        tied = any(fmt.get("act") == "tied_embedding" for fmt in tables.values())
        rows.append(("Embeddings and lm_head", f"{qc.get('embedding_bits')}-bit weight-only, groups of "
                     f"{next(iter(tables.values())).get('group_size', 128)} hidden channels per row, fp16 scale and "
                     f"zero point ({', '.join(tables)}{'; tied: one table' if tied else ''})"))
    rows += [
        ("Quantized linears", str(n_quant)),
        ("Kept in floating point", ", ".join(kept)),
        ("Calibration", calibration_text(qc, calibration_source)),
        ("Checkpoint format", f"hf-outliertune format version {qc.get('format_version')}, safetensors only"),
    ]
    return rows


def calibration_text(qc: dict[str, Any], source: str | None = None) -> str:
    """`64 sequences × 512 tokens (32768 tokens) of <source>`, from the config's calibration summary."""
    summary = qc.get("calibration_summary") or {}
    if not summary:
        return "not recorded"
    size = f"{summary['num_samples']} sequences × {summary['seq_len']} tokens ({summary['tokens']} tokens)"
    return f"{size} of {source}" if source else f"{size}; source not recorded"


def _ppl(entry: Any, key: str) -> tuple[float, int, int]:
    """(perplexity, windows, seq_len) of one evaluation entry; `ValueError` naming the bad field."""
    try:
        ppl, windows, seq_len = float(entry["perplexity"]), int(entry["windows"]), int(entry["seq_len"])
    except (TypeError, KeyError, ValueError) as err:
        raise ValueError(
            f"evaluation[{key!r}] = {entry!r} is not a perplexity result: it needs 'perplexity', 'windows' and "
            "'seq_len' (pass the JSON written by `hf-outliertune quantize --eval FILE --json OUT`)."
        ) from err
    if not math.isfinite(ppl) or ppl < 1.0:
        raise ValueError(f"evaluation[{key!r}] has perplexity {ppl!r}; a perplexity is a finite number >= 1.")
    return ppl, windows, seq_len


def quality_section(qc: dict[str, Any], evaluation: dict[str, Any] | None, eval_data: str | None) -> str:
    """A markdown table of the measured perplexities, or a "not measured" note."""
    if not evaluation:
        return ("Not measured: no evaluation was passed when this card was written. Measure it with "
                "`hf-outliertune eval --model <this repo or directory> --text <file>`.")
    if "ppl_quantized" not in evaluation:
        raise ValueError(
            f"evaluation has keys {sorted(evaluation)} but no 'ppl_quantized'; pass the JSON written by "
            "`hf-outliertune quantize --eval FILE --json OUT`."
        )
    q, windows, seq_len = _ppl(evaluation["ppl_quantized"], "ppl_quantized")
    rows = []
    if evaluation.get("ppl_float") is not None:
        f, f_windows, f_seq = _ppl(evaluation["ppl_float"], "ppl_float")
        if (f_windows, f_seq) != (windows, seq_len):
            raise ValueError(
                f"evaluation compares {f_windows} × {f_seq} float windows with {windows} × {seq_len} quantized "
                "ones; measure both on the same windows."
            )
        rows.append(f"| base model (float) | {f:.3f} | | {windows} × {seq_len} |")
        rows.append(f"| this checkpoint ({scheme_label(qc)}) | {q:.3f} | {100 * (q / f - 1):+.2f} % | "
                    f"{windows} × {seq_len} |")
    else:
        rows.append(f"| this checkpoint ({scheme_label(qc)}) | {q:.3f} | not measured | {windows} × {seq_len} |")
    data = eval_data or "not recorded"
    dtype = f", {evaluation['dtype']} weights" if evaluation.get("dtype") else ""
    return "\n".join([
        f"Perplexity on {data} (exp of the mean next-token loss over non-overlapping windows, no BOS{dtype}; "
        "measured by `hf-outliertune quantize --eval`; lower is better).",
        "",
        "| model | perplexity | vs float | windows × tokens |",
        "|---|---:|---:|---|",
        *rows,
    ])


def hardware_notes(qc: dict[str, Any]) -> list[str]:
    """What runs where, for the card's hardware section."""
    if qc.get("act_bits") is None:
        compute = ("Linear layers keep floating-point activations and multiply by the packed low-bit weights: "
                   "a Triton low-bit matmul on CUDA GPUs, a pure-PyTorch reference (dequantize, then matmul) on CPU.")
    else:
        compute = ("Linear layers quantize their inputs and run integer GEMMs (int8 × int8 → int32, scales in the "
                   "epilogue): Triton kernels on CUDA GPUs, a pure-PyTorch reference of the same math on CPU.")
    return [
        compute,
        "Loads on CPU or a CUDA GPU, with or without `device_map=\"auto\"`; disk offload is not supported.",
        "The CPU path is a correctness reference, not a fast inference path.",
    ]


def files_section(sizes: dict[str, int]) -> str:
    """Weight files and their total size, as written."""
    weights = {name: n for name, n in sizes.items() if name.endswith(".safetensors")}
    total = sum(weights.values())
    return f"{len(weights)} safetensors file(s), {total / 2**20:.2f} MiB of weights in total." if weights else ""


def base_model_metadata(source: str | None) -> dict[str, Any]:
    """License and language carried from the base model: its README metadata (a local directory, or the Hub
    for a Hub id when reachable) or a GGUF file's `general.license` / `general.languages`."""
    if not source:
        return {}
    if source.endswith(".gguf") and os.path.isfile(source):
        return _gguf_metadata(source)
    readme = os.path.join(source, "README.md")
    try:
        if os.path.isfile(readme):
            data = ModelCard.load(readme).data
        elif is_hub_id(source):
            data = ModelCard.load(source).data
        else:
            return {}
    except Exception:  # no card, offline, gated: the license is then unknown, not guessed
        return {}
    return {k: v for k, v in (("license", data.license), ("language", data.language)) if v}


def _local_name(path: str) -> str:
    return os.path.basename(os.path.normpath(path))


def _gguf_metadata(path: str) -> dict[str, Any]:
    try:
        import gguf
    except ImportError:
        return {}
    fields = gguf.GGUFReader(path).fields
    out: dict[str, Any] = {}
    for key, name in (("general.license", "license"), ("general.languages", "language")):
        if key in fields:
            out[name] = fields[key].contents()
    return out


def model_card(qc: dict[str, Any], inputs: CardInputs, file_sizes: dict[str, int] | None = None) -> ModelCard:
    """Render the card of a checkpoint with quantization config dict `qc` (`config.to_dict()`)."""
    from . import __version__

    _formats(qc)
    carried = base_model_metadata(inputs.base_source) or base_model_metadata(inputs.base_model)
    license_id = inputs.license or carried.get("license")
    hub_base = inputs.base_model if is_hub_id(inputs.base_model) else None
    label, method = scheme_label(qc), method_name(qc)
    tags = ["hf-outliertune", "quantized", label.lower(), method, f"{qc['weight_bits']}-bit", *inputs.tags]
    data = ModelCardData(
        base_model=hub_base,
        base_model_relation="quantized" if hub_base else None,
        license=license_id,
        language=carried.get("language"),
        library_name="transformers",
        pipeline_tag="text-generation",
        datasets=inputs.datasets or None,
        tags=list(dict.fromkeys(tags)),
    )
    if inputs.base_model is None:
        base_text = "A causal language model (base model not recorded)"
    elif hub_base:
        base_text = f"[{hub_base}](https://huggingface.co/{hub_base})"
    else:
        base_text = f"`{_local_name(inputs.base_model)}` (a local file or directory)"
    if inputs.base_source and inputs.base_source != inputs.base_model:
        base_text += f", weights loaded from `{_local_name(inputs.base_source)}`,"
    if license_id:
        license_text = (f"`{license_id}`, carried from the base model." if not inputs.license
                        else f"`{license_id}`.")
    else:
        license_text = "Not recorded: the base model's license could not be read. Check it before use."
    repo = inputs.repo_id or "path/to/this/checkpoint"
    template = resources.files("hf_outliertune.model_cards").joinpath(TEMPLATE).read_text(encoding="utf-8")
    return ModelCard.from_template(
        data,
        template_str=template,
        model_name=(inputs.repo_id or "").split("/")[-1] or f"{label} checkpoint",
        base_model_text=base_text,
        scheme=label,
        method=method,
        paper=PAPERS.get(method, method),
        format_version=qc.get("format_version"),
        repo_id=repo,
        rows=quantization_rows(qc, inputs.calibration_data),
        quality=quality_section(qc, inputs.evaluation, inputs.eval_data),
        hardware=hardware_notes(qc),
        files=files_section(file_sizes or {}),
        license_text=license_text,
        version=__version__,
    )
