"""Shared fixtures: tiny saved models, the offline tokenizer, evaluation tokens and one quantized checkpoint.

Everything is built offline (no Hub access) and cached per test session so the suite stays fast on 2 CPU cores.
"""

from __future__ import annotations

import os
import sys

# Quiet progress bars and transformers' load reports; set before transformers/tqdm are imported.
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

import pytest  # noqa: E402
import torch  # noqa: E402  (does not import triton)

if not torch.cuda.is_available():
    # Triton fixes interpreter vs. compiled mode when it is first imported, and importing hf_outliertune
    # imports triton. Without a GPU a Triton kernel can only run interpreted (test_kernels.py relies on it),
    # so choose that mode before the first import. CPU tensors never dispatch to Triton either way.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_outliertune  # noqa: E402  (registers the quant method)
from hf_outliertune import OutlierTuneConfig  # noqa: E402
from tiny_models import sample_text, save_tiny, tiny_tokenizer  # noqa: E402

NUM_THREADS = 2
torch.set_num_threads(NUM_THREADS)


def rel_err(ref: torch.Tensor, got: torch.Tensor) -> float:
    """‖got − ref‖ / ‖ref‖ in float64."""
    ref, got = ref.double(), got.double()
    return ((got - ref).norm() / ref.norm()).item()


def logits_of(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def small_config(**overrides) -> OutlierTuneConfig:
    """A fast calibration config for the tiny models (absmax weights: no GPTQ loop)."""
    kwargs = dict(
        dataset=[sample_text()],
        tokenizer=tiny_tokenizer(),
        num_samples=8,
        seq_len=64,
        weight_algorithm="absmax",
    )
    kwargs.update(overrides)
    return OutlierTuneConfig(**kwargs)


@pytest.fixture(scope="session")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def text() -> str:
    return sample_text()


@pytest.fixture(scope="session")
def eval_ids(tok) -> torch.Tensor:
    """Two sequences of 96 tokens from the end of the sample text (mostly outside the calibration windows)."""
    t = sample_text()
    ids = tok(t[-6000:], return_tensors="pt", add_special_tokens=False).input_ids[0]
    assert ids.numel() >= 192
    return ids[:192].view(2, 96).clone()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """`tiny_dir(arch)`: a saved random tiny model (with the tokenizer) of `arch`, built once per session."""
    cache: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in cache:
            cache[arch] = save_tiny(arch, str(tmp_path_factory.mktemp(f"tiny_{arch}")))
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def llama_ckpt(tiny_dir, tmp_path_factory, eval_ids):
    """A tiny Llama quantized on load (W8A8) and saved: (checkpoint dir, logits of the in-memory quantized model).

    Llama exercises every tensor kind of the format: folded biases and `input_offset` (static, RMSNorm
    without bias) and dynamic per-token layers.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(), dtype=torch.float32)
    logits = logits_of(model, eval_ids)
    out = str(tmp_path_factory.mktemp("llama_w8a8"))
    model.save_pretrained(out)
    return out, logits
