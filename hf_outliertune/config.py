"""`OutlierTuneConfig`: the user-facing quantization config (a transformers `QuantizationConfigMixin`)."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

QUANT_METHOD = "hf_outliertune"
# 1: W8A8/W6A6 (int8 weights). 2: adds the weight-only layout (packed low-bit codes, fp16 scales/zeros).
# 3: adds quantized token embeddings and lm_heads (`embedding_bits`).
FORMAT_VERSION = 3

WEIGHT_BITS = (8, 6)  # with activation quantization (act_bits set)
ACT_BITS = (8, 6)
WEIGHT_ONLY_BITS = (2, 3, 4, 8)  # weight-only mode (act_bits=None)
ACTIVATION_SCHEMES = ("outliertune", "smoothquant", "per_token")
WEIGHT_ALGORITHMS = ("absmax", "mse", "gptq", "rtn")
W8A8_WEIGHT_ALGORITHMS = ("absmax", "mse", "gptq")
WEIGHT_ONLY_ALGORITHMS = ("rtn", "gptq")
GROUP_DIMS = ("oc", "ic", "adaptive")
WEIGHT_CLIPS = ("minmax", "mse")
MIN_GROUP_SIZE, MAX_GROUP_SIZE = 16, 1024
# weight-only defaults, filled in when act_bits=None and the field is left unset
WEIGHT_ONLY_DEFAULTS = {"group_size": 128, "group_dim": "adaptive", "weight_clip": "mse"}
DEFAULT_REFIT_ROUNDS = 2  # weight-only, with calibration data: refit, re-choose codes, refit
GPTQ_DAMP_DEFAULTS = {"weight_only": 0.01, "weight_and_activation": 0.1}
ACT_CLIPS = ("max", "mse")
NON_NORM_ACTIVATIONS = ("per_token", "static")
EMBEDDING_BITS = (8, 4)  # weight-only grids for the token embeddings and the lm_head

# Keys that describe the calibration run but are not JSON-safe (a tokenizer object, a list of texts).
_RUNTIME_ONLY_KEYS = ("dataset", "tokenizer")


def _check_choice(name: str, value: Any, allowed: tuple) -> None:
    if not any(value == a and type(value) is type(a) for a in allowed):  # 8.0 and 1 are not 8 and True
        raise ValueError(f"OutlierTuneConfig.{name}={value!r} is invalid; allowed values: {list(allowed)}.")


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"OutlierTuneConfig.{name}={value!r} is invalid; it must be an integer >= {minimum}.")


def check_calibration_device(device: Any) -> str | None:
    """`calibration_device` as stored: None, or a torch device other than 'meta' as its string ('cuda', 'cuda:1',
    'cpu'), so the config stays JSON-safe. Whether the device exists on this machine is checked when quantizing."""
    if device is None:
        return None
    try:
        parsed = torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (RuntimeError, TypeError):
        parsed = None
    if parsed is None or parsed.type == "meta":
        raise ValueError(
            f"OutlierTuneConfig.calibration_device={device!r} is invalid; pass None (calibrate where the model is) "
            "or a device string such as 'cuda', 'cuda:1' or 'cpu'."
        )
    return str(parsed)


class OutlierTuneConfig(QuantizationConfigMixin):
    """Configuration of OutlierTune W8A8 / W6A6 quantization, or of AdaDim weight-only quantization.

    Two modes. With ``act_bits`` 8 or 6, OutlierTune: static per-channel activations, symmetric per-output-channel
    int8 weights. With ``act_bits=None``, weight-only (AdaDim): asymmetric min-max groups with zero points,
    packed 2/3/4/8-bit codes, activations stay in floating point; the activation fields below are then unused.

    Args:
        weight_bits: bits of the weight grid: 8 or 6 with activation quantization; 2, 3, 4 or 8 weight-only.
        act_bits: bits of the activation grid (8 or 6), or ``None`` for weight-only quantization.
        symmetrize: shift each norm-fed channel by the midpoint of its calibrated range before quantizing.
        activation_scheme: ``"outliertune"`` (static per-channel steps folded into norm and weights),
            ``"smoothquant"`` (SmoothQuant migration, then dynamic per-token) or ``"per_token"``
            (no migration, dynamic per-token everywhere); the last two exist as baselines.
        smoothquant_alpha: migration strength of the ``"smoothquant"`` scheme.
        migration_alpha: SmoothQuant-style migration strength for the linears with per-token inputs
            (o_proj, down_proj...): their input channels are divided by s_j = max|x_j|^α / max|W_j|^(1-α),
            folded exactly into the producing linear's rows (v_proj, up_proj). ``None`` disables it.
        non_norm_activations: how linears whose input is not a norm output (o_proj, down_proj...) quantize
            it: ``"per_token"`` (dynamic, default) or ``"static"`` (per-channel steps folded into the
            producing linear's rows, round+clamp at run time; measured much less accurate).
        rotate_dynamic: rotate the per-token-quantized inputs by a block-Hadamard transform at run time
            (weights rotated offline), which spreads single-channel outliers over the block.
        act_clip: ``"max"`` (raw calibrated range) or ``"mse"`` (per-channel clipping search) for the
            static activation steps.
        weight_algorithm: with activation quantization ``"absmax"``, ``"mse"`` (searched clip per output
            channel) or ``"gptq"``; weight-only ``"rtn"`` (round to nearest) or ``"gptq"``.
        gptq_damp: GPTQ Hessian damping as a fraction of the mean diagonal; default 0.1 with activation quantization
            (where it is also the ridge of the least-squares correction), 0.01 weight-only (GPTQ's usual value).
        group_size: weight-only: values per quantization group, a power of two in [16, 1024] (default 128); a
            dimension that is not a multiple of it ends with a smaller group.
        group_dim: weight-only: ``"oc"`` (a group is `group_size` consecutive input channels of one output row,
            the usual layout), ``"ic"`` (consecutive output channels of one input column, which isolates input
            channels with activation outliers) or ``"adaptive"`` (AdaDim: per layer, the one whose quantized
            output is closer to the float one on the calibration data; default).
        weight_clip: weight-only: ``"mse"`` (per group, the range shrink that minimises the activation-weighted
            squared error; default) or ``"minmax"`` (each group's full range, widened to include 0).
        refit_rounds: weight-only: rounds of least-squares refit of every group's scale and zero to its codes,
            minimising the layer's output error on the calibration data (the zero points become fractional fp16);
            every round but the last re-chooses the codes on the refitted grid (GPTQ again, or RTN). Default 2,
            or 0 for RTN with a fixed `group_dim` and min-max groups, which then stays data-free.
        act_order: GPTQ visits input channels by decreasing Hessian diagonal (with per-OC groups this fixes the
            group grids on the original weight: static groups). Only weight-only mode can turn it off.
        gptq_quantized_inputs: run GPTQ on the layer's *quantized* inputs with the float outputs as target
            (a least-squares weight correction, then GPTQ), so weights compensate activation rounding.
        dataset: calibration texts (list of strings) or a path to a text file. Not needed for weight-only RTN
            with a fixed `group_dim` and min-max groups (see `needs_calibration`).
        tokenizer: tokenizer object or a name/path `AutoTokenizer` can load; defaults to the model's.
        num_samples: number of calibration sequences.
        seq_len: tokens per calibration sequence.
        calibration_batch_size: sequences per forward pass during calibration.
        calibration_device: ``None`` (default): calibrate where the model is. A device (``"cuda"``,
            ``"cuda:1"``, ``"cpu"``): calibrate and quantize one decoder block at a time on it, for models larger
            than that device's memory. The model stays where it is (e.g. on CPU); each block moves to the device
            for its calibration and moves back quantized, and the activations between blocks wait on CPU and
            reach the device `calibration_batch_size` sequences at a time (docs/memory.md). Used when
            quantizing only; a pre-quantized checkpoint loads where `device_map` says.
        embedding_bits: ``None`` (default) keeps the token embeddings and the lm_head in floating point; 8 or 4
            stores both as weight-only grouped codes (groups of 128 hidden channels, fp16 scale and zero point,
            round to nearest), in either mode. The lm_head then runs through the fused low-bit kernel on float
            activations; a tied pair keeps one table. For large vocabularies this is most of what the linears
            leave in floating point (Llama-3-8B: 2 GiB of bf16 tables).
        modules_to_not_convert: module names (or name suffixes) kept in floating point. The lm_head and the
            embeddings are kept unless `embedding_bits` is set.
        module_formats: filled in after quantization: per quantized module, how its input is quantized.
            Lets a saved checkpoint be rebuilt without calibration data.
    """

    def __init__(
        self,
        weight_bits: int = 8,
        act_bits: int | None = 8,
        symmetrize: bool = True,
        activation_scheme: str = "outliertune",
        smoothquant_alpha: float = 0.5,
        migration_alpha: float | None = 0.5,
        non_norm_activations: str = "per_token",
        rotate_dynamic: bool = True,
        act_clip: str = "max",
        weight_algorithm: str = "gptq",
        gptq_damp: float | None = None,
        gptq_quantized_inputs: bool = True,
        group_size: int | None = None,
        group_dim: str | None = None,
        weight_clip: str | None = None,
        refit_rounds: int | None = None,
        act_order: bool = True,
        dataset: list[str] | str | None = None,
        tokenizer: Any = None,
        num_samples: int = 64,
        seq_len: int = 512,
        calibration_batch_size: int = 8,
        seed: int = 0,
        embedding_bits: int | None = None,
        modules_to_not_convert: list[str] | None = None,
        module_formats: dict[str, dict[str, Any]] | None = None,
        format_version: int = FORMAT_VERSION,
        calibration_summary: dict[str, Any] | None = None,
        calibration_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        self.quant_method = QUANT_METHOD
        self.weight_bits = weight_bits
        self.act_bits = act_bits
        self.symmetrize = symmetrize
        self.activation_scheme = activation_scheme
        self.smoothquant_alpha = smoothquant_alpha
        self.migration_alpha = migration_alpha
        self.non_norm_activations = non_norm_activations
        self.rotate_dynamic = rotate_dynamic
        self.act_clip = act_clip
        self.weight_algorithm = weight_algorithm
        self.gptq_damp = gptq_damp
        self.gptq_quantized_inputs = gptq_quantized_inputs
        self.group_size = group_size
        self.group_dim = group_dim
        self.weight_clip = weight_clip
        self.refit_rounds = refit_rounds
        self.act_order = act_order
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.num_samples = num_samples
        self.seq_len = seq_len
        self.calibration_batch_size = calibration_batch_size
        self.seed = seed
        self.embedding_bits = embedding_bits
        self.modules_to_not_convert = modules_to_not_convert
        self.module_formats = module_formats
        self.format_version = format_version
        self.calibration_summary = calibration_summary
        self.calibration_device = calibration_device
        unknown = set(kwargs) - {"quant_method"}
        if unknown:
            raise ValueError(f"OutlierTuneConfig got unknown arguments {sorted(unknown)}; remove them.")
        self.post_init()

    def post_init(self) -> None:
        """Validate every field; raise `ValueError` naming the field and the allowed values."""
        _check_choice("act_bits", self.act_bits, (*ACT_BITS, None))
        _check_choice("act_order", self.act_order, (True, False))
        _check_choice("embedding_bits", self.embedding_bits, (*EMBEDDING_BITS, None))
        if self.weight_only:
            self._check_weight_only()
        else:
            self._check_weight_and_activation()
        _check_choice("symmetrize", self.symmetrize, (True, False))
        _check_choice("rotate_dynamic", self.rotate_dynamic, (True, False))
        _check_choice("gptq_quantized_inputs", self.gptq_quantized_inputs, (True, False))
        _check_choice("non_norm_activations", self.non_norm_activations, NON_NORM_ACTIVATIONS)
        _check_choice("activation_scheme", self.activation_scheme, ACTIVATION_SCHEMES)
        _check_choice("act_clip", self.act_clip, ACT_CLIPS)
        if not isinstance(self.smoothquant_alpha, (int, float)) or not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(
                f"OutlierTuneConfig.smoothquant_alpha={self.smoothquant_alpha!r} is invalid; it must be in [0, 1]."
            )
        if self.migration_alpha is not None and (
            not isinstance(self.migration_alpha, (int, float)) or not 0.0 <= self.migration_alpha <= 1.0
        ):
            raise ValueError(
                f"OutlierTuneConfig.migration_alpha={self.migration_alpha!r} is invalid; it must be in [0, 1] or None."
            )
        if not isinstance(self.gptq_damp, (int, float)) or not 0.0 < self.gptq_damp < 1.0:
            raise ValueError(f"OutlierTuneConfig.gptq_damp={self.gptq_damp!r} is invalid; it must be in (0, 1).")
        _check_int("num_samples", self.num_samples, 1)
        _check_int("seq_len", self.seq_len, 2)
        _check_int("calibration_batch_size", self.calibration_batch_size, 1)
        _check_int("seed", self.seed, 0)
        self.calibration_device = check_calibration_device(self.calibration_device)
        _check_int("format_version", self.format_version, 1)
        if self.format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses hf-outliertune format version {self.format_version}, but the installed "
                f"hf-outliertune reads versions up to {FORMAT_VERSION}. Upgrade it: pip install -U hf-outliertune."
            )
        if self.dataset is not None and not isinstance(self.dataset, (str, list, tuple)):
            raise ValueError(
                f"OutlierTuneConfig.dataset has type {type(self.dataset).__name__}; pass a list of strings or a "
                "path to a text file."
            )
        if self.modules_to_not_convert is not None and not all(
            isinstance(m, str) for m in self.modules_to_not_convert
        ):
            raise ValueError("OutlierTuneConfig.modules_to_not_convert must be a list of module names (strings).")

    def _check_weight_only(self) -> None:
        """Weight-only mode: bits, algorithm and group fields; unset group fields get their defaults."""
        if not any(self.weight_bits == b and type(self.weight_bits) is int for b in WEIGHT_ONLY_BITS):
            raise ValueError(
                f"OutlierTuneConfig.weight_bits={self.weight_bits!r} is invalid in weight-only mode (act_bits=None); "
                f"allowed values: {list(WEIGHT_ONLY_BITS)}."
            )
        if self.weight_algorithm not in WEIGHT_ONLY_ALGORITHMS:
            hint = " (for a clip search use weight_clip='mse')" if self.weight_algorithm in WEIGHT_ALGORITHMS else ""
            raise ValueError(
                f"OutlierTuneConfig.weight_algorithm={self.weight_algorithm!r} is invalid in weight-only mode "
                f"(act_bits=None); allowed values: {list(WEIGHT_ONLY_ALGORITHMS)}{hint}."
            )
        for name, default in WEIGHT_ONLY_DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.gptq_damp is None:
            self.gptq_damp = GPTQ_DAMP_DEFAULTS["weight_only"]
        _check_choice("group_dim", self.group_dim, GROUP_DIMS)
        _check_choice("weight_clip", self.weight_clip, WEIGHT_CLIPS)
        if self.refit_rounds is None:
            self.refit_rounds = 0 if self._rtn_from_weights_alone else DEFAULT_REFIT_ROUNDS
        if isinstance(self.refit_rounds, bool) or not isinstance(self.refit_rounds, int) or not 0 <= self.refit_rounds <= 8:
            raise ValueError(
                f"OutlierTuneConfig.refit_rounds={self.refit_rounds!r} is invalid; it must be an integer in [0, 8] "
                f"(0 turns the group-parameter refit off; default {DEFAULT_REFIT_ROUNDS})."
            )
        g = self.group_size
        if isinstance(g, bool) or not isinstance(g, int) or not MIN_GROUP_SIZE <= g <= MAX_GROUP_SIZE or g & (g - 1):
            raise ValueError(
                f"OutlierTuneConfig.group_size={g!r} is invalid; it must be a power of two in "
                f"[{MIN_GROUP_SIZE}, {MAX_GROUP_SIZE}] (e.g. 64 or 128). A dimension that is not a multiple of it "
                "ends with a smaller group."
            )

    def _check_weight_and_activation(self) -> None:
        """W8A8/W6A6 mode: weight bits and algorithm; the weight-only fields must stay unset."""
        if self.weight_bits in WEIGHT_ONLY_BITS and self.weight_bits not in WEIGHT_BITS and type(self.weight_bits) is int:
            raise ValueError(
                f"OutlierTuneConfig.weight_bits={self.weight_bits} needs weight-only mode: pass act_bits=None "
                f"(AdaDim grouped weights). With act_bits={self.act_bits} the weight grid is one of {list(WEIGHT_BITS)}."
            )
        _check_choice("weight_bits", self.weight_bits, WEIGHT_BITS)
        if self.weight_algorithm == "rtn":
            raise ValueError(
                "OutlierTuneConfig.weight_algorithm='rtn' is the weight-only mode's rounding (act_bits=None); with "
                f"activation quantization use one of {list(W8A8_WEIGHT_ALGORITHMS)} ('absmax' is plain rounding)."
            )
        _check_choice("weight_algorithm", self.weight_algorithm, W8A8_WEIGHT_ALGORITHMS)
        for name in (*WEIGHT_ONLY_DEFAULTS, "refit_rounds"):
            if getattr(self, name) is not None:
                raise ValueError(
                    f"OutlierTuneConfig.{name}={getattr(self, name)!r} only applies to weight-only quantization "
                    f"(act_bits=None); with act_bits={self.act_bits} weights have one step per output channel. "
                    f"Remove {name} or pass act_bits=None."
                )
        if self.gptq_damp is None:
            self.gptq_damp = GPTQ_DAMP_DEFAULTS["weight_and_activation"]
        if not self.act_order:
            raise ValueError(
                "OutlierTuneConfig.act_order=False is only supported in weight-only mode (act_bits=None); W8A8/W6A6 "
                "GPTQ always uses act-order."
            )

    @property
    def weight_only(self) -> bool:
        """True in weight-only (AdaDim) mode: `act_bits=None`, activations stay in floating point."""
        return self.act_bits is None

    @property
    def _rtn_from_weights_alone(self) -> bool:
        """RTN with a fixed layout and min-max groups: it chooses grids and codes from the weight alone."""
        return self.weight_algorithm == "rtn" and self.group_dim != "adaptive" and self.weight_clip == "minmax"

    @property
    def needs_calibration(self) -> bool:
        """False only for weight-only RTN with fixed layout, min-max groups and no refit: it needs no data at all."""
        return not (self.weight_only and self._rtn_from_weights_alone and not self.refit_rounds)

    @property
    def uses_static_activations(self) -> bool:
        """True when norm-fed linears get static per-channel activation steps (the OutlierTune path)."""
        return not self.weight_only and self.activation_scheme == "outliertune"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict; the calibration texts and tokenizer object are summarised, not stored."""
        out = {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k not in _RUNTIME_ONLY_KEYS}
        out["dataset"] = self.dataset if isinstance(self.dataset, str) else None
        out["tokenizer"] = self.tokenizer if isinstance(self.tokenizer, str) else None
        return out

    def __repr__(self) -> str:
        shown = {k: v for k, v in self.to_dict().items() if k != "module_formats"}
        n = len(self.module_formats or {})
        return f"OutlierTuneConfig({shown}, module_formats=<{n} modules>)"
