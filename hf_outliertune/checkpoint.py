"""On-disk format checks: a pre-quantized checkpoint must hold every tensor its config promises."""

from __future__ import annotations

from typing import Iterable

import torch
from safetensors import safe_open

from .config import MAX_GROUP_SIZE, MIN_GROUP_SIZE, WEIGHT_ONLY_BITS
from .kernels.packing import group_params_shape, words_per_row
from .embeddings import EMBEDDING_ACT, TIED_HEAD_ACT
from .weight_only_linear import WEIGHT_ONLY_ACT

_ST_DTYPES = {"I8": torch.int8, "I32": torch.int32, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class CheckpointError(ValueError):
    """A pre-quantized checkpoint is incomplete, corrupt or does not match its config."""


def expected_tensors(
    module_formats: dict[str, dict], shapes: dict[str, tuple[int, int]]
) -> dict[str, tuple[tuple[int, ...], set[torch.dtype]]]:
    """Tensor name → (shape, allowed dtypes) for every quantized module of the config."""
    floats = {torch.float32, torch.float16, torch.bfloat16}
    out: dict[str, tuple[tuple[int, ...], set[torch.dtype]]] = {}
    for name, fmt in module_formats.items():
        n_out, n_in = shapes[name]
        if fmt.get("act") == "float":
            out[f"{name}.bias"] = ((n_out,), floats)
            continue
        if fmt.get("act") == TIED_HEAD_ACT:  # reads its source embedding's tensors
            continue
        if fmt.get("act") in (WEIGHT_ONLY_ACT, EMBEDDING_ACT):
            params = group_params_shape(n_out, n_in, fmt["group_size"], fmt["group_dim"])
            out[f"{name}.qweight"] = ((n_out, words_per_row(fmt["bits"], n_in)), {torch.int32})
            out[f"{name}.weight_scale"] = (params, {torch.float16})
            out[f"{name}.weight_zero"] = (params, {torch.float16})
            if fmt.get("bias"):
                out[f"{name}.bias"] = ((n_out,), floats)
            if fmt.get("act") == EMBEDDING_ACT:
                out[f"{name}.output_scale"] = ((), floats)
            continue
        out[f"{name}.weight"] = ((n_out, n_in), {torch.int8})
        out[f"{name}.weight_scale"] = ((n_out,), {torch.float32})
        if fmt.get("bias"):
            out[f"{name}.bias"] = ((n_out,), floats)
        if fmt.get("offset"):
            out[f"{name}.input_offset"] = ((n_in,), {torch.float32})
    return out


def check_weight_only_format(name: str, fmt: dict) -> None:
    """Refuse a weight-only module format whose bits, group size or layout this version cannot rebuild."""
    bits, size, dim = fmt.get("bits"), fmt.get("group_size"), fmt.get("group_dim")
    valid_size = type(size) is int and MIN_GROUP_SIZE <= size <= MAX_GROUP_SIZE and not size & (size - 1)
    if type(bits) is not int or bits not in WEIGHT_ONLY_BITS or not valid_size or dim not in ("oc", "ic"):
        raise CheckpointError(
            f"module_formats[{name!r}] = {fmt!r} is not a valid weight-only format (bits in {list(WEIGHT_ONLY_BITS)}, "
            f"group_size a power of two in [{MIN_GROUP_SIZE}, {MAX_GROUP_SIZE}], group_dim 'oc' or 'ic'); the "
            "config.json is corrupt or from another tool. Re-save the checkpoint."
        )


def verify_checkpoint(files: Iterable[str], expected: dict[str, tuple[tuple[int, ...], set[torch.dtype]]]) -> None:
    """Read only the safetensors headers and check names, shapes and dtypes of the quantized tensors."""
    found: dict[str, tuple[tuple[int, ...], str]] = {}
    files = list(files or [])
    for path in files:
        if not str(path).endswith(".safetensors"):
            raise CheckpointError(f"{path} is not a safetensors file; hf-outliertune only reads safetensors.")
        try:
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = (tuple(sl.get_shape()), sl.get_dtype())
        except Exception as err:  # safetensors raises several error types for damaged files
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}); re-download or re-save it.") from err
    problems = []
    for key, (shape, dtypes) in expected.items():
        if key not in found:
            problems.append(f"missing {key}")
            continue
        got_shape, got_dtype = found[key]
        if got_shape != shape:
            problems.append(f"{key} has shape {list(got_shape)}, expected {list(shape)}")
        if _ST_DTYPES.get(got_dtype) not in dtypes:
            problems.append(f"{key} has dtype {got_dtype}, expected one of {sorted(str(d) for d in dtypes)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(
            f"The hf-outliertune checkpoint does not match its quantization config: {shown}. It is corrupt, "
            "truncated or was modified; re-save it from the quantized model or quantize the base model again."
        )
