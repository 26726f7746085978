"""Exactness of the two rewrites applied to the per-token-quantized linears: migration and rotation."""

from __future__ import annotations

import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import tiny_model  # noqa: E402

from hf_outliertune.architectures import resolve_arch, decoder_layers  # noqa: E402
from hf_outliertune.folding import fold_into_producer, reduce_to_producer  # noqa: E402
from hf_outliertune.rotation import hadamard, hadamard_block_size, rotate, rotate_hessian  # noqa: E402


@pytest.mark.parametrize("n,expected", [(576, 64), (1536, 512), (14336, 2048), (4096, 2048), (7, 1)])
def test_block_size_is_largest_power_of_two_divisor(n, expected):
    assert hadamard_block_size(n) == expected


def test_hadamard_is_orthonormal():
    h = hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)


def test_rotation_preserves_products_and_hessian():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 96, generator=g), torch.randn(12, 96, generator=g)
    x[:, 5] *= 300.0  # one outlier channel
    block = hadamard_block_size(96)
    assert torch.allclose(rotate(x, block) @ rotate(w, block).T, x @ w.T, rtol=1e-4, atol=1e-2)
    xr = rotate(x, block)
    assert torch.allclose(rotate_hessian(x.T @ x, block), xr.T @ xr, rtol=1e-4, atol=1.0)
    # the outlier is spread: the rotated max/median ratio is far smaller
    ratio = lambda t: (t.abs().amax(1) / t.abs().median(1).values).median()  # noqa: E731
    assert ratio(xr) < ratio(x) / 5


@pytest.mark.parametrize("arch", ["llama", "qwen2", "opt", "gemma3_text"])
def test_migration_fold_keeps_the_float_model_exact(arch):
    model = tiny_model(arch)
    folded = copy.deepcopy(model)
    spec = resolve_arch(folded)
    g = torch.Generator().manual_seed(1)
    for layer in decoder_layers(folded, spec):
        for consumer_name, producer_name in spec.producers:
            consumer, producer = layer.get_submodule(consumer_name), layer.get_submodule(producer_name)
            n_rep = consumer.in_features // producer.out_features
            head_dim = getattr(layer.get_submodule(consumer_name.rsplit(".", 1)[0]), "head_dim", 1)
            scale = torch.rand(producer.out_features, generator=g) * 4 + 0.25
            fold_into_producer(producer, consumer, scale, n_rep, head_dim)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=g)
    with torch.no_grad():
        a, b = model(ids).logits, folded(ids).logits
    changed = [n for n, p in folded.named_parameters() if not torch.equal(p, model.get_parameter(n))]
    assert any("v_proj" in n for n in changed)  # the fold really rewrote weights...
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4)  # ...and kept the function


def test_reduce_to_producer_takes_max_over_query_heads():
    per_consumer = torch.arange(2 * 3 * 4, dtype=torch.float32)  # 2 kv heads, 3 query heads each, head_dim 4
    out = reduce_to_producer(per_consumer, n_rep=3, head_dim=4)
    assert out.tolist() == [8.0, 9.0, 10.0, 11.0, 20.0, 21.0, 22.0, 23.0]
