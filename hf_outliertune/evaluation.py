"""Perplexity over non-overlapping windows of a text (the accuracy metric of the docs and the CLI)."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    perplexity: float
    windows: int
    seq_len: int
    tokens_scored: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def perplexity(
    model: nn.Module,
    tokenizer: Any,
    text: str,
    seq_len: int = 512,
    max_windows: int | None = None,
    batch_size: int = 4,
    desc: str = "perplexity",
) -> PerplexityResult:
    """exp(mean next-token NLL) over the first `max_windows` windows of `seq_len` tokens (no BOS added)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n_windows = ids.numel() // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    if n_windows == 0:
        raise ValueError(f"The text has {ids.numel()} tokens, fewer than one window of seq_len={seq_len}.")
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in tqdm(windows.split(batch_size), desc=desc, leave=False):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum").item()
            count += targets.numel()
    return PerplexityResult(math.exp(nll / count), n_windows, seq_len, count)
