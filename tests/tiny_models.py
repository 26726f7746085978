"""Tiny random models of real architectures and an offline tokenizer, for fast unit tests."""

from __future__ import annotations

import os
from functools import lru_cache

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

DATA_DIR = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
VOCAB = 512

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
ARCH_CONFIGS = {
    "llama": dict(_COMMON),
    "mistral": dict(_COMMON, sliding_window=None),
    "qwen2": dict(_COMMON),
    "gemma": dict(_COMMON, head_dim=16),
    "gemma3_text": dict(_COMMON, head_dim=16, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=256, word_embed_proj_dim=64),
}


def sample_text(max_chars: int = 200_000) -> str:
    """Real English text for calibrating tiny models (WikiText-2 validation if present, else generated)."""
    path = os.path.join(DATA_DIR, "wikitext-2-raw", "wiki.valid.raw")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(max_chars)
    words = ["the", "model", "quantized", "channel", "outlier", "weight", "scale", "token", "layer", "norm"]
    g = torch.Generator().manual_seed(0)
    return " ".join(words[i] for i in torch.randint(len(words), (max_chars // 6,), generator=g).tolist())


@lru_cache(maxsize=1)
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A small BPE tokenizer trained offline on `sample_text()`."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([sample_text(50_000)], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def tiny_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """A random float32 model of `arch` with norms and biases perturbed so folding is actually exercised."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(arch, **ARCH_CONFIGS[arch])
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.2)
            elif name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.05)
        # a few outlier channels in the embeddings, as real LLMs have
        emb = model.get_input_embeddings().weight
        emb[:, :3] *= 8.0
    return model


def save_tiny(arch: str, path: str, seed: int = 0) -> str:
    """Save a tiny model and the tokenizer to `path` (a local model directory)."""
    tiny_model(arch, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path
