"""Calibration data: texts → token windows, the inputs of every decoder block, and per-channel statistics."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

from .offload import Offload


class CalibrationError(ValueError):
    """The calibration data cannot support the requested calibration."""


def load_texts(dataset: list[str] | tuple[str, ...] | str | None) -> list[str]:
    """Calibration texts from a list of strings or a path to a text file."""
    if dataset is None:
        raise CalibrationError(
            "Quantizing on load needs calibration text: pass OutlierTuneConfig(dataset=[...texts...]) or "
            "dataset='path/to/file.txt'. A pre-quantized checkpoint needs none."
        )
    if isinstance(dataset, str):
        if not os.path.isfile(dataset):
            raise CalibrationError(f"OutlierTuneConfig.dataset={dataset!r} is not a file; pass a list of texts.")
        with open(dataset, encoding="utf-8") as f:
            texts = [f.read()]
    else:
        texts = list(dataset)
    if not all(isinstance(t, str) for t in texts):
        raise CalibrationError("OutlierTuneConfig.dataset must contain strings only.")
    if not any(t.strip() for t in texts):
        raise CalibrationError("OutlierTuneConfig.dataset is empty: it contains no text to calibrate on.")
    return texts


def calibration_windows(
    texts: list[str], tokenizer: Any, num_samples: int, seq_len: int, seed: int = 0
) -> torch.Tensor:
    """`(num_samples, seq_len)` token windows cut without overlap from the joined texts, chosen at random."""
    ids = tokenizer("\n\n".join(texts), return_tensors="pt", add_special_tokens=False).input_ids[0]
    available = ids.numel() // seq_len
    if available < num_samples:
        raise CalibrationError(
            f"The calibration text has {ids.numel()} tokens: {available} windows of seq_len={seq_len}, but "
            f"num_samples={num_samples} were requested ({num_samples * seq_len} tokens). Pass more text, or "
            "lower num_samples or seq_len."
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randperm(available, generator=gen)[:num_samples].sort().values * seq_len
    return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


class _StopForward(Exception):
    """Raised by a hook once the activations it needs are captured."""


@dataclass
class BlockInputs:
    """The hidden states entering the current block (one tensor per batch) and every block's kwargs."""

    hidden: list[torch.Tensor]
    layer_kwargs: list[list[dict[str, Any]]] = field(default_factory=list)


def capture_block_inputs(
    model: nn.Module, layers: nn.ModuleList, input_ids: torch.Tensor, batch_size: int, offload: Offload | None = None
) -> BlockInputs:
    """Run the model once to record block 0's input and the keyword arguments each block receives.

    Each block's kwargs (masks, rotary embeddings...) are recorded separately because architectures
    such as Gemma 2/3 give alternate blocks different masks and rotary tables.

    With an active `offload`, the blocks stay where they are and are not run (each passes its input through
    unchanged: only block 0's input is kept, and the kwargs do not depend on the hidden states), the model's
    other modules (embeddings, rotary tables...) visit the execution device for the pass, and what is
    recorded is kept on CPU.
    """
    if offload is None or not offload.active:
        return _capture(model, layers, input_ids, batch_size, next(layers[0].parameters()).device, None)
    with _non_block_modules_on(model, layers, offload.device), _blocks_skipped(layers):
        return _capture(model, layers, input_ids, batch_size, offload.device, offload)


def _capture(
    model: nn.Module,
    layers: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    offload: Offload | None,
) -> BlockInputs:
    captured = BlockInputs(hidden=[], layer_kwargs=[[] for _ in layers])
    handles = []
    memo: dict = {}  # offloaded: one CPU copy of a tensor that several blocks' kwargs share (per batch)

    def make_hook(idx: int):
        def hook(_module: nn.Module, args: tuple, kwargs: dict[str, Any]):
            kw = dict(kwargs)
            hidden = args[0] if args else kw.pop("hidden_states")
            if idx == 0:
                captured.hidden.append(offload.store(hidden.detach()) if offload is not None else hidden.detach())
            captured.layer_kwargs[idx].append(offload.store(kw, memo) if offload is not None else kw)
            if idx == len(layers) - 1:
                raise _StopForward

        return hook

    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(make_hook(i), with_kwargs=True))
    try:
        with torch.no_grad():
            for batch in input_ids.split(batch_size):
                memo.clear()
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
    finally:
        memo.clear()
        for h in handles:
            h.remove()
    return captured


@contextmanager
def _blocks_skipped(layers: nn.ModuleList):
    """Make every block return its input unchanged (its pre-hooks still run) for the duration.

    Supported architectures' blocks return the hidden states as a tensor (transformers >= 5)."""

    def passthrough(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states

    try:
        for layer in layers:
            layer.forward = passthrough  # an instance attribute, found before the class's forward
        yield
    finally:
        for layer in layers:
            layer.__dict__.pop("forward", None)


@contextmanager
def _non_block_modules_on(model: nn.Module, layers: nn.ModuleList, device: torch.device):
    """Move every parameter and buffer of `model` outside `layers` (embeddings, rotary tables, final norm) to
    `device` for the duration, then each back to where it was. An untied output head is not needed (the pass
    stops at the last block) and stays where it is."""

    def ids(module: nn.Module | None) -> set[int]:
        return {id(t) for t in (*module.parameters(), *module.buffers())} if module is not None else set()

    untied_head = ids(model.get_output_embeddings()) - ids(model.get_input_embeddings())
    stay = ids(layers) | untied_head
    moved: list[tuple[nn.Module, str, bool, torch.device]] = []
    try:
        for module in model.modules():
            for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
                if tensor is None or id(tensor) in stay or tensor.device == device:
                    continue
                is_param = name in module._parameters
                moved.append((module, name, is_param, tensor.device))
                stay.add(id(tensor))  # a tensor shared by two modules (tied weights) moves once
                _set_tensor(module, name, is_param, tensor, device)
        yield
    finally:
        for module, name, is_param, home in reversed(moved):
            tensor = module._parameters[name] if is_param else module._buffers[name]
            _set_tensor(module, name, is_param, tensor, home)


def _set_tensor(module: nn.Module, name: str, is_param: bool, tensor: torch.Tensor, device: torch.device) -> None:
    if is_param:
        tensor.data = tensor.data.to(device)  # same Parameter object: tied weights stay tied
    else:
        module._buffers[name] = tensor.to(device)


def run_block(layer: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """One decoder block's output hidden states."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


@dataclass
class ChannelStats:
    """Running per-input-channel statistics of one activation tensor."""

    need_hessian: bool
    sample_stride: int = 1
    count: int = 0
    ch_min: torch.Tensor | None = None
    ch_max: torch.Tensor | None = None
    x_sum: torch.Tensor | None = None
    xtx: torch.Tensor | None = None
    samples: list[torch.Tensor] = field(default_factory=list)

    def update(self, x: torch.Tensor, where: str) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise CalibrationError(
                f"NaN/inf activations at {where} during calibration. The model overflows in its current dtype "
                "or its weights are corrupt; load it with dtype=torch.float32 or check the checkpoint."
            )
        if self.ch_min is None:
            k = x.shape[1]
            self.ch_min = torch.full((k,), float("inf"), device=x.device)
            self.ch_max = torch.full((k,), float("-inf"), device=x.device)
            self.x_sum = torch.zeros(k, device=x.device, dtype=torch.float64)
            if self.need_hessian:
                self.xtx = torch.zeros(k, k, device=x.device, dtype=torch.float64)
        self.ch_min = torch.minimum(self.ch_min, x.amin(0))
        self.ch_max = torch.maximum(self.ch_max, x.amax(0))
        self.x_sum += x.sum(0, dtype=torch.float64)
        if self.xtx is not None:
            self.xtx += (x.t() @ x).double()
        self.count += x.shape[0]
        self.samples.append(x[:: self.sample_stride])  # a strided token subset for clipping searches

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.ch_max.abs(), self.ch_min.abs())

    def sample_tensor(self) -> torch.Tensor:
        return torch.cat(self.samples)


class PairMoments:
    """Σ x qᵀ and Σ q qᵀ of an input x and its quantized version q = `quantizer(x)`."""

    def __init__(self, quantizer: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.quantizer = quantizer
        self.cross: torch.Tensor | None = None
        self.hessian: torch.Tensor | None = None

    def update(self, x: torch.Tensor, where: str) -> None:
        target, q = self.quantizer(x.detach().reshape(-1, x.shape[-1]).float())
        if self.cross is None:
            k = q.shape[1]
            self.cross = torch.zeros(k, k, device=q.device, dtype=torch.float64)
            self.hessian = torch.zeros(k, k, device=q.device, dtype=torch.float64)
        self.cross += (target.t() @ q).double()
        self.hessian += (q.t() @ q).double()


def collect_stats(
    layer: nn.Module,
    watched: nn.Module,
    watch_output: bool,
    inputs: Iterable[tuple[torch.Tensor, dict[str, Any]]],
    stats: ChannelStats | PairMoments,
    where: str,
) -> None:
    """Feed the calibration inputs through `layer` and record the output (or input) of `watched`."""

    def record(tensor: torch.Tensor) -> None:
        stats.update(tensor, where)
        raise _StopForward

    if watch_output:
        handle = watched.register_forward_hook(lambda _m, _a, out: record(out))
    else:
        handle = watched.register_forward_pre_hook(lambda _m, args: record(args[0]))
    try:
        with torch.no_grad():
            for hidden, kwargs in inputs:
                try:
                    run_block(layer, hidden, kwargs)
                except _StopForward:
                    pass
    finally:
        handle.remove()
