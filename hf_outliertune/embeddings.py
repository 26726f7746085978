"""Weight-only quantization of the token embedding table and the lm_head (`OutlierTuneConfig(embedding_bits=...)`).

Both tables are stored like a `WeightOnlyLinear`: packed codes with an fp16 scale and zero point per group of
`EMBEDDING_GROUP_SIZE` hidden channels of one row (round to nearest on each group's min-max range; with a
clip search at 4 bits). A lookup gathers the codes of the requested rows and dequantizes only those; the lm_head
multiplies through the fused low-bit kernel. A tied lm_head (`tie_word_embeddings`) reads the embedding's codes,
so the table is stored once, as in the float model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .adadim import GroupQuantized, quantize_rtn
from .kernels.lowbit_matmul import lowbit_matmul
from .kernels.packing import dequantize_packed
from .storage_dtypes import KeepsStorageDtypes
from .weight_only_linear import WeightOnlyLinear, load_packed_weight, register_packed_weight

EMBEDDING_GROUP_SIZE = 128
EMBEDDING_ACT = "embedding"  # module_formats "act" of a QuantizedEmbedding
TIED_HEAD_ACT = "tied_embedding"  # module_formats "act" of an lm_head that reads a QuantizedEmbedding's codes
_ROWS_PER_CHUNK = 8192  # rows quantized at once: bounds the fp32 working copy of a large vocabulary


class EmbeddingQuantizationError(ValueError):
    """The model's embeddings or lm_head cannot be quantized as configured."""


class QuantizedEmbedding(KeepsStorageDtypes):
    """Token embeddings as grouped low-bit codes (the `WeightOnlyLinear` layout, groups along the hidden size).

    `output_scale` (a 0-d tensor in the model's dtype) multiplies every looked-up row: 1, or √hidden for Gemma's
    scaled embeddings. Its dtype is the output dtype, so `model.to(dtype)` moves the output along with it.
    """

    storage_dtype_buffers = ("weight_scale", "weight_zero")

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        group_size: int,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.bits = bits
        self.group_size = group_size
        self.padding_idx = padding_idx
        register_packed_weight(self, num_embeddings, embedding_dim, bits, group_size, "oc", device)
        self.register_buffer("output_scale", torch.ones((), dtype=dtype, device=device))

    @classmethod
    def from_quantized(cls, quantized: GroupQuantized, padding_idx: int | None, output_scale: float,
                       dtype: torch.dtype) -> "QuantizedEmbedding":
        """The table storing `quantized` (codes `(vocab, hidden)`, per-OC groups)."""
        vocab, dim = quantized.codes.shape
        table = cls(vocab, dim, quantized.bits, quantized.group_size, padding_idx, dtype, quantized.codes.device)
        load_packed_weight(table, quantized)
        with torch.no_grad():
            table.output_scale.fill_(output_scale)
        return table

    @property
    def format(self) -> dict[str, object]:
        """What a checkpoint needs to rebuild this module (stored in the config's `module_formats`)."""
        return {"act": EMBEDDING_ACT, "bits": self.bits, "group_size": self.group_size, "group_dim": "oc",
                "padding_idx": self.padding_idx}

    def effective_weight(self) -> torch.Tensor:
        """The fp32 table `(vocab, hidden)` this module looks rows up in (before `output_scale`)."""
        return dequantize_packed(self.qweight, self.weight_scale, self.weight_zero, self.bits, self.group_size, "oc",
                                 self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids.reshape(-1)
        table = dequantize_packed(self.qweight[rows], self.weight_scale[rows], self.weight_zero[rows], self.bits,
                                  self.group_size, "oc", self.embedding_dim)
        out = table.to(self.output_scale.dtype) * self.output_scale
        return out.reshape(*input_ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, W{self.bits} g{self.group_size}, "
                f"output_scale={self.output_scale.item():.4g}")


class TiedQuantizedHead(nn.Module):
    """An lm_head tied to a `QuantizedEmbedding`: logits = x · tableᵀ through the fused low-bit kernel.

    It holds no tensors: it reads the embedding's codes (not registered as a submodule, so the state dict and
    `model.to()` see the table once)."""

    def __init__(self, embedding: QuantizedEmbedding) -> None:
        super().__init__()
        self.__dict__["embedding"] = embedding
        self.in_features = embedding.embedding_dim
        self.out_features = embedding.num_embeddings

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e = self.embedding
        y = lowbit_matmul(x.reshape(-1, self.in_features), e.qweight, e.weight_scale, e.weight_zero, e.bits,
                          e.group_size, "oc", None)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"tied to the quantized embedding ({self.out_features} × {self.in_features})"


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    return next((name for name, m in model.named_modules() if m is module), None) if module is not None else None


def _excluded(name: str, modules_to_not_convert: list[str] | None) -> bool:
    return any(name == m or name.endswith(f".{m}") for m in modules_to_not_convert or [])


def _output_scale(embedding: nn.Module) -> float:
    """The multiplier a scaled embedding (Gemma) applies to its rows; 1 for a plain `nn.Embedding`."""
    if type(embedding) is nn.Embedding:
        return 1.0
    scale = getattr(embedding, "embed_scale", None)
    if isinstance(embedding, nn.Embedding) and scale is not None:
        return float(scale)
    raise EmbeddingQuantizationError(
        f"The input embedding is a {type(embedding).__name__}, which embedding_bits does not support (a plain "
        "nn.Embedding, or one that only multiplies by embed_scale, as Gemma's, is). Pass embedding_bits=None."
    )


def _quantize_table(weight: torch.Tensor, bits: int) -> GroupQuantized:
    """RTN per-OC groups of `EMBEDDING_GROUP_SIZE` of a `(rows, hidden)` table, `_ROWS_PER_CHUNK` rows at a time;
    at 4 bits each group's range is clip-searched."""
    parts = [quantize_rtn(weight[i:i + _ROWS_PER_CHUNK], bits, EMBEDDING_GROUP_SIZE, "oc", clip=bits < 8)
             for i in range(0, weight.shape[0], _ROWS_PER_CHUNK)]
    return GroupQuantized(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]),
                          torch.cat([p.zero for p in parts]), bits, EMBEDDING_GROUP_SIZE, "oc")


@torch.no_grad()
def quantize_embeddings(model: nn.Module, bits: int, modules_to_not_convert: list[str] | None = None
                        ) -> dict[str, dict[str, Any]]:
    """Quantize the input embedding and the lm_head of `model` in place to `bits` (4 or 8); return their formats.

    A tied pair becomes one `QuantizedEmbedding` and a `TiedQuantizedHead` reading it; an untied lm_head becomes a
    `WeightOnlyLinear`. Their formats carry `"table": "input"` / `"output"`, which tells them from the decoder's
    linears. Names in `modules_to_not_convert` stay in floating point (a tied pair only as a whole).
    """
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    emb_name, head_name = _module_name(model, embedding), _module_name(model, head)
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight is embedding.weight
    skip_emb = emb_name is None or _excluded(emb_name, modules_to_not_convert)
    skip_head = head_name is None or _excluded(head_name, modules_to_not_convert)
    if tied and skip_emb != skip_head:
        raise EmbeddingQuantizationError(
            f"{emb_name} and {head_name} share one weight (tie_word_embeddings), so they are quantized together or "
            f"not at all; list both or neither in modules_to_not_convert."
        )
    formats: dict[str, dict[str, Any]] = {}
    if not skip_emb:
        scale = _output_scale(embedding)
        table = QuantizedEmbedding.from_quantized(_quantize_table(embedding.weight, bits), embedding.padding_idx,
                                                  scale, embedding.weight.dtype)
        model.set_submodule(emb_name, table)
        formats[emb_name] = {**table.format, "table": "input"}
        if tied:
            model.set_submodule(head_name, TiedQuantizedHead(table))
            formats[head_name] = {"act": TIED_HEAD_ACT, "source": emb_name, "table": "output"}
    if not skip_head and not tied:
        if not isinstance(head, nn.Linear):
            raise EmbeddingQuantizationError(
                f"The output embedding {head_name} is a {type(head).__name__}, not an nn.Linear; embedding_bits "
                "cannot quantize it. Pass embedding_bits=None or add it to modules_to_not_convert."
            )
        layer = WeightOnlyLinear.from_quantized(_quantize_table(head.weight, bits), head.bias, head.weight.dtype)
        model.set_submodule(head_name, layer)
        formats[head_name] = {**layer.format, "table": "output"}
    untie(model, set(formats))
    return formats


def untie(model: nn.Module, names: set[str]) -> None:
    """Tell transformers the quantized tables are no longer tied weights: their `.weight`s are gone, and a tied
    head shares the codes itself. Drops the tied-weight entries that touch them (loading and saving would look
    them up) and sets `tie_word_embeddings=False` where they were tied, so a rebuilt model does not re-tie them."""
    def touches(key: str) -> bool:
        module = key.rsplit(".", 1)[0]
        return any(n == module or n.endswith(f".{module}") for n in names)

    for sub in model.modules():
        keys = getattr(sub, "all_tied_weights_keys", None)
        if keys and any(touches(t) or touches(s) for t, s in keys.items()):
            sub.all_tied_weights_keys = {t: s for t, s in keys.items() if not (touches(t) or touches(s))}
            config = getattr(sub, "config", None)
            text_config = config.get_text_config() if config is not None else None
            for cfg in {id(c): c for c in (config, text_config) if c is not None}.values():
                if getattr(cfg, "tie_word_embeddings", False):
                    cfg.tie_word_embeddings = False
