"""`KeepsStorageDtypes`: quantized modules whose scales keep their stored dtype through `model.to(dtype)`."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn


class KeepsStorageDtypes(nn.Module):
    """`.to(dtype)`, `.half()`, `.bfloat16()` cast every floating buffer, which would round fp32 steps to bf16 or
    turn fp16 group scales into bf16 ones the kernels refuse. The buffers named in `storage_dtype_buffers` keep
    their exact values and dtype and only follow device moves; everything else (biases, anchors) follows the cast."""

    storage_dtype_buffers: tuple[str, ...] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "KeepsStorageDtypes":
        kept = {name: self._buffers[name] for name in self.storage_dtype_buffers if self._buffers.get(name) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self
