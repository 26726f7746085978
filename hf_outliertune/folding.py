"""Exact rewrites of float modules: fold per-channel steps and shifts into norms and linear columns.

After `fold_into_norm(norm, Δ, z)` the norm emits `(y - z) / Δ` when it has a bias to absorb the shift,
else `y / Δ`; `fold_into_linear` rewrites a reader of that output so the block computes the same function.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .architectures import UnsupportedArchitectureError


def fold_into_norm(norm: nn.Module, step: torch.Tensor, shift: torch.Tensor | None, weight_offset: float) -> bool:
    """Divide the norm's output channels by `step` (and subtract `shift` if it has a bias).

    `weight_offset` is 1.0 for norms that scale by (1 + weight) (Gemma). Returns True when the shift was
    absorbed by the norm's bias.
    """
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedArchitectureError(
            f"{type(norm).__name__} has no per-channel weight; the activation step cannot be folded into it."
        )
    effective = weight.data.float() + weight_offset
    weight.data = (effective / step - weight_offset).to(weight.dtype)
    bias = getattr(norm, "bias", None)
    if bias is None:
        return False
    b = bias.data.float()
    if shift is not None:
        b = b - shift
    bias.data = (b / step).to(bias.dtype)
    return True


def fold_into_linear(linear: nn.Linear, step: torch.Tensor, shift: torch.Tensor | None) -> torch.Tensor:
    """Rewrite `linear` to read the folded input: W ← W·diag(step), b ← b + W·shift.

    Returns the new float weight; the bias change is applied in place (a bias is created if needed).
    The bias term is needed whenever the input is shifted, whether the norm's bias or the quantized
    layer's `input_offset` performs the shift.
    """
    w = linear.weight.data.float()
    if shift is not None:
        correction = w @ shift.float()
        if linear.bias is None:
            linear.bias = nn.Parameter(correction.to(linear.weight.dtype), requires_grad=False)
        else:
            linear.bias.data = (linear.bias.data.float() + correction).to(linear.bias.dtype)
    folded = w * step.float()[None, :]
    linear.weight.data = folded.to(linear.weight.dtype)
    return folded


def fold_into_producer(
    producer: nn.Linear, consumer: nn.Linear, scale: torch.Tensor, n_rep: int, head_dim: int
) -> None:
    """Divide the producer's output rows by `scale` and multiply the consumer's input columns by it.

    `scale` has one entry per producer output channel. With grouped-query attention each value
    channel feeds `n_rep` query heads, so the consumer's columns use the scale repeated per head group.
    """
    s = scale.float()
    producer.weight.data = (producer.weight.data.float() / s[:, None]).to(producer.weight.dtype)
    if producer.bias is not None:
        producer.bias.data = (producer.bias.data.float() / s).to(producer.bias.dtype)
    expanded = expand_to_consumer(s, n_rep, head_dim)
    consumer.weight.data = (consumer.weight.data.float() * expanded[None, :]).to(consumer.weight.dtype)


def expand_to_consumer(per_producer: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Map a per-producer-channel vector onto the consumer's input channels (GQA head repetition)."""
    if n_rep == 1:
        return per_producer
    return per_producer.view(-1, 1, head_dim).expand(-1, n_rep, head_dim).reshape(-1)


def reduce_to_producer(per_consumer: torch.Tensor, n_rep: int, head_dim: int) -> torch.Tensor:
    """Max of a per-consumer-channel vector over the query heads that share each producer channel."""
    if n_rep == 1:
        return per_consumer
    return per_consumer.view(-1, n_rep, head_dim).amax(dim=1).reshape(-1)
