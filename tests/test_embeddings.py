"""Quantized token embeddings and lm_heads (`embedding_bits`): accuracy of the tables, tied and untied models,
the save/load round trip, and the errors for what cannot be done."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import OutlierTuneConfig
from hf_outliertune.adadim import max_code
from hf_outliertune.checkpoint import CheckpointError
from hf_outliertune.embeddings import (
    EMBEDDING_GROUP_SIZE,
    EmbeddingQuantizationError,
    QuantizedEmbedding,
    TiedQuantizedHead,
    quantize_embeddings,
)
from hf_outliertune.export_compressed_tensors import ExportError, export_compressed_tensors
from hf_outliertune.model_card import quantization_rows
from hf_outliertune.weight_only_linear import WeightOnlyLinear

from conftest import logits_of, rel_err, small_config
from tiny_models import tiny_model


def _tensor_names(ckpt: str) -> set[str]:
    with safe_open(os.path.join(ckpt, "model.safetensors"), framework="pt") as f:
        return set(f.keys())


@pytest.fixture(scope="module")
def tied_ckpt(tiny_dir, tmp_path_factory, eval_ids):
    """Tiny Gemma (tied embeddings, scaled by √hidden) quantized W8A8 with 8-bit tables, saved."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("gemma"), quantization_config=small_config(embedding_bits=8),
                                                 dtype=torch.float32)
    out = str(tmp_path_factory.mktemp("gemma_tables"))
    model.save_pretrained(out)
    return out, logits_of(model, eval_ids), model


@pytest.mark.parametrize("bad", [3, 16, 8.0, True, "8"])
def test_invalid_embedding_bits_is_refused(bad):
    with pytest.raises(ValueError, match="embedding_bits"):
        OutlierTuneConfig(embedding_bits=bad)


@pytest.mark.parametrize("bits", [8, 4])
def test_table_error_is_within_half_a_step(bits):
    """Every entry of the quantized table is within half its group's step of the float table (the grid covers each
    group's range, clipped at 4 bits), and the lookup returns exactly the dequantized rows."""
    model = tiny_model("llama")
    weight = model.get_input_embeddings().weight.detach().clone()
    quantize_embeddings(model, bits)
    table = model.get_input_embeddings()
    assert isinstance(table, QuantizedEmbedding) and table.bits == bits
    step = table.weight_scale.float().repeat_interleave(EMBEDDING_GROUP_SIZE, 1)[:, : weight.shape[1]]
    err = (table.effective_weight() - weight).abs()
    if bits == 8:  # min-max range: rounding only
        assert (err <= step / 2 + 1e-6).all()
    else:  # clip search: the clipped tails may exceed half a step, the mean error stays below it
        assert err.mean() < (step / 2).mean()
    assert rel_err(weight, table.effective_weight()) < (0.01 if bits == 8 else 0.2)  # 8x outlier channels in a row
    ids = torch.tensor([[0, 5, 511], [7, 7, 3]])
    assert torch.equal(table(ids), table.effective_weight()[ids])


def test_untied_model_quantizes_both_tables_and_reloads_bit_exactly(tiny_dir, tmp_path, eval_ids):
    config = small_config(embedding_bits=8)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=config, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(),
                                                 dtype=torch.float32)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert isinstance(model.lm_head, WeightOnlyLinear) and model.lm_head.bits == 8
    formats = model.config.quantization_config.module_formats
    assert formats["model.embed_tokens"]["table"] == "input" and formats["lm_head"]["table"] == "output"
    logits = logits_of(model, eval_ids)
    assert rel_err(logits_of(plain, eval_ids), logits) < 0.03  # 8-bit tables cost little on top of W8A8
    model.save_pretrained(tmp_path)
    names = _tensor_names(str(tmp_path))
    assert {"model.embed_tokens.qweight", "lm_head.qweight", "model.embed_tokens.output_scale"} <= names
    assert "model.embed_tokens.weight" not in names and "lm_head.weight" not in names
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert isinstance(reloaded.get_input_embeddings(), QuantizedEmbedding)
    assert torch.equal(logits_of(reloaded, eval_ids), logits)


def test_tied_model_stores_one_table(tied_ckpt, eval_ids):
    ckpt, logits, model = tied_ckpt
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(table, QuantizedEmbedding) and isinstance(head, TiedQuantizedHead)
    assert head.embedding is table
    assert not list(head.parameters()) and not list(head.buffers())
    assert model.config.tie_word_embeddings is False  # transformers must not re-tie the vanished .weight
    assert not any("lm_head" in n for n in _tensor_names(ckpt))
    # Gemma scales its embeddings by √hidden; the quantized table keeps that factor
    assert table.output_scale.item() == pytest.approx(math.sqrt(model.config.hidden_size), rel=1e-6)
    reloaded = AutoModelForCausalLM.from_pretrained(ckpt)
    assert reloaded.get_output_embeddings().embedding is reloaded.get_input_embeddings()
    assert torch.equal(logits_of(reloaded, eval_ids), logits)


def test_tied_head_matches_the_float_head_on_the_dequantized_table(tied_ckpt):
    _, _, model = tied_ckpt
    table, head = model.get_input_embeddings(), model.get_output_embeddings()
    x = torch.randn(3, 5, table.embedding_dim)
    ref = x @ table.effective_weight().t()
    assert rel_err(ref, head(x)) < 1e-6
    assert head(x).shape == (3, 5, table.num_embeddings)


def test_table_output_follows_the_model_dtype(tied_ckpt):
    _, _, model = tied_ckpt
    table = model.get_input_embeddings()
    ids = torch.tensor([[1, 2, 3]])
    ref = table(ids)
    half = table.to(torch.bfloat16)(ids)
    assert half.dtype == torch.bfloat16
    assert rel_err(ref, half.float()) < 1e-2
    table.to(torch.float32)


def test_weight_only_mode_with_4_bit_tables(tiny_dir, tmp_path, eval_ids):
    config = small_config(act_bits=None, weight_bits=4, weight_algorithm="rtn", group_size=32, embedding_bits=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("opt"), quantization_config=config, dtype=torch.float32)
    float_model = AutoModelForCausalLM.from_pretrained(tiny_dir("opt"), dtype=torch.float32)
    assert isinstance(model.get_output_embeddings(), TiedQuantizedHead)
    assert model.get_input_embeddings().bits == 4
    logits = logits_of(model, eval_ids)
    assert rel_err(logits_of(float_model, eval_ids), logits) < 0.15  # random tables with 8x outlier channels
    model.save_pretrained(tmp_path)
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(str(tmp_path)), eval_ids), logits)


def test_modules_to_not_convert_keeps_an_untied_head(tiny_dir):
    config = small_config(embedding_bits=8, modules_to_not_convert=["lm_head"])
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=config, dtype=torch.float32)
    assert isinstance(model.get_input_embeddings(), QuantizedEmbedding)
    assert type(model.lm_head) is nn.Linear
    assert "lm_head" not in model.config.quantization_config.module_formats


def test_half_of_a_tied_pair_cannot_be_excluded():
    model = tiny_model("gemma")
    with pytest.raises(EmbeddingQuantizationError, match="share one weight.*both or neither"):
        quantize_embeddings(model, 8, ["lm_head"])
    assert type(model.get_input_embeddings()).__name__ != "QuantizedEmbedding"  # nothing was changed


def test_unsupported_embedding_class_is_refused():
    model = tiny_model("llama")

    class Rotated(nn.Embedding):
        def forward(self, ids):
            return super().forward(ids).flip(-1)

    old = model.get_input_embeddings()
    new = Rotated(old.num_embeddings, old.embedding_dim)
    model.set_input_embeddings(new)
    with pytest.raises(EmbeddingQuantizationError, match="Rotated.*embedding_bits=None"):
        quantize_embeddings(model, 8)
    assert model.get_input_embeddings() is new


def test_missing_table_tensor_is_reported(tied_ckpt, tmp_path):
    ckpt, _, _ = tied_ckpt
    from safetensors.torch import load_file, save_file

    tensors = load_file(os.path.join(ckpt, "model.safetensors"))
    del tensors["model.embed_tokens.weight_scale"]
    for name in os.listdir(ckpt):
        if name != "model.safetensors":
            with open(os.path.join(ckpt, name), "rb") as src, open(tmp_path / name, "wb") as dst:
                dst.write(src.read())
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing model.embed_tokens.weight_scale"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_tied_head_without_its_source_is_reported(tied_ckpt, tmp_path):
    ckpt, _, _ = tied_ckpt
    for name in os.listdir(ckpt):
        with open(os.path.join(ckpt, name), "rb") as src, open(tmp_path / name, "wb") as dst:
            dst.write(src.read())
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"]["module_formats"]["lm_head"]["source"] = "model.layers.0.mlp"
    path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'model.layers.0.mlp'.*not a quantized embedding"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path))


def test_card_and_export_know_about_the_tables(tied_ckpt, tmp_path):
    _, _, model = tied_ckpt
    qc = model.config.quantization_config.to_dict()
    rows = dict(quantization_rows(qc))
    assert "8-bit weight-only" in rows["Embeddings and lm_head"] and "tied: one table" in rows["Embeddings and lm_head"]
    assert "embeddings" not in rows["Kept in floating point"]
    assert rows["Quantized linears"] == str(sum(1 for f in qc["module_formats"].values() if "table" not in f
                                                and f["act"] != "float"))
    with pytest.raises(ExportError, match="embedding_bits=None"):
        export_compressed_tensors(model, str(tmp_path))


def test_max_code_of_the_tables():
    """The 4-bit table uses the whole grid: codes reach 0 and 15 (the clip search keeps the range's ends in use)."""
    model = tiny_model("llama")
    quantize_embeddings(model, 4)
    table = model.get_input_embeddings()
    from hf_outliertune.kernels.packing import unpack_codes

    codes = unpack_codes(table.qweight, 4, table.embedding_dim)
    assert codes.min() == 0 and codes.max() == max_code(4)
    assert hf_outliertune.FORMAT_VERSION >= 3
