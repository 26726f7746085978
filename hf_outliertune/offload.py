"""Calibrate on one device while the model and the calibration activations wait on another.

With an execution device (`OutlierTuneConfig(calibration_device="cuda")`, or `quantize(..., device="cuda")`) a
model that sits on CPU is quantized one decoder block at a time on the GPU: the block moves to the device,
is calibrated and quantized there, and moves back (quantized); the hidden states between blocks stay on CPU
and go to the device one calibration batch at a time. Peak device memory is then one block, one batch of
activations and that block's statistics (docs/memory.md), whatever the size of the model.

Without an execution device (`device=None`) every helper here is a no-op: the pipelines run where the model
is, exactly as before, with no extra copies.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn as nn

from .config import check_calibration_device

STORAGE = torch.device("cpu")  # where the hidden states between blocks wait in offloaded mode


def resolve_device(device: str | torch.device | None) -> torch.device | None:
    """The execution device as a `torch.device` with an explicit index, checked to be usable; None stays None."""
    name = check_calibration_device(device)  # a device string other than 'meta', or ValueError
    if name is None:
        return None
    dev = torch.device(name)
    try:
        torch.empty(0, device=dev)
    except Exception as err:  # no CUDA build, no driver, invalid ordinal...
        raise ValueError(
            f"calibration device {name!r} cannot be used on this machine ({type(err).__name__}: {err}). "
            "Pass a device that exists, or calibration_device=None to calibrate where the model is."
        ) from err
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (CPU for a module without tensors)."""
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return STORAGE


def to_device(obj: Any, device: torch.device, memo: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None) -> Any:
    """`obj` with every tensor inside (nested in tuples, lists and dicts) moved to `device`; other objects as is.

    `memo` keeps a tensor that appears several times (one mask shared by every block's kwargs) a single copy."""
    if torch.is_tensor(obj):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the original is kept so its id cannot be reused meanwhile
        return memo[id(obj)][1]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(to_device(v, device, memo) for v in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(v, device, memo) for v in obj)
    return obj


@contextmanager
def block_on(module: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """Move `module` to `device` for the duration of the block, then back to the device it came from.

    Submodules created meanwhile (quantized layers swapped in on `device`) move back with it."""
    if device is None:
        yield module
        return
    home = module_device(module)
    module.to(device)
    try:
        yield module
    finally:
        module.to(home)


class StreamedBatches:
    """Calibration batches `(hidden, kwargs)` that wait on CPU and reach the execution device one at a time.

    Iterable any number of times (each pass streams again), sliceable like the list it replaces."""

    def __init__(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]], device: torch.device) -> None:
        self.hidden, self.kwargs, self.device = hidden, kwargs, device

    def __len__(self) -> int:
        return len(self.hidden)

    def __getitem__(self, index: slice) -> "StreamedBatches":
        return StreamedBatches(self.hidden[index], self.kwargs[index], self.device)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        for hidden, kwargs in zip(self.hidden, self.kwargs):
            yield to_device(hidden, self.device), to_device(kwargs, self.device, {})


class Offload:
    """Where the calibration of each block runs (`device`) and where its activations wait in between.

    `device=None`: inactive; blocks stay put, batches are the plain list of (hidden, kwargs) on the model's
    device, outputs stay there too. Otherwise blocks visit `device` one at a time and activations wait on CPU."""

    def __init__(self, device: str | torch.device | None = None) -> None:
        self.device = resolve_device(device)

    @property
    def active(self) -> bool:
        return self.device is not None

    def block(self, layer: nn.Module):
        """Context manager: `layer` on the execution device while inside (no-op when inactive)."""
        return block_on(layer, self.device)

    def batches(self, hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> list | StreamedBatches:
        """The block's calibration batches, as the pipelines iterate them."""
        if not self.active:
            return list(zip(hidden, kwargs))
        return StreamedBatches(hidden, kwargs, self.device)

    def store(self, obj: Any, memo: dict | None = None) -> Any:
        """An activation (or kwargs) to keep between blocks: moved to CPU when active, untouched otherwise."""
        return to_device(obj, STORAGE, memo) if self.active else obj

    def run(self, layer: nn.Module, batches: list | StreamedBatches) -> list[torch.Tensor]:
        """The block's output for every batch (the next block's input), stored where activations wait."""
        from .calibration import run_block

        with torch.no_grad():
            return [self.store(run_block(layer, hidden, kwargs)) for hidden, kwargs in batches]


def check_materialized(model: nn.Module) -> None:
    """Refuse weights that are not in memory (accelerate's CPU/disk offload leaves them on 'meta')."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            "Some weights of the model are on the 'meta' device (offloaded by accelerate through a device_map "
            "that mixes GPU and 'cpu'/'disk'), so they cannot be calibrated. For a model larger than the GPU, "
            "load it on CPU (device_map='cpu' or no device_map) with OutlierTuneConfig(calibration_device='cuda'): "
            "blocks then move to the GPU one at a time."
        )
