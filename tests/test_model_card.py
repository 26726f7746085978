"""The generated model card: states only what the config, the files and the caller's measurements say."""

from __future__ import annotations

import pytest
from huggingface_hub import ModelCard

from hf_outliertune import OutlierTuneConfig
from hf_outliertune.model_card import CardInputs, model_card

LLAMA_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj")
EVALUATION = {  # as `hf-outliertune quantize --json` writes it
    "dtype": "float32",
    "ppl_float": {"perplexity": 28.686, "windows": 40, "seq_len": 512, "tokens_scored": 20440},
    "ppl_quantized": {"perplexity": 28.744, "windows": 40, "seq_len": 512, "tokens_scored": 20440},
}


def w8a8_config() -> dict:
    formats = {f"model.layers.{i}.{n}": {"act": "dynamic" if n.endswith(("o_proj", "down_proj")) else "static",
                                         "offset": True, "bias": False}
               for i in range(2) for n in LLAMA_LINEARS}
    return OutlierTuneConfig(module_formats=formats, calibration_summary={
        "num_samples": 64, "seq_len": 512, "tokens": 32768}).to_dict()


def weight_only_config() -> dict:
    formats = {"model.layers.0.mlp.up_proj": {"act": "none", "bits": 4, "group_size": 16, "group_dim": "ic"},
               "model.layers.0.mlp.down_proj": {"act": "none", "bits": 4, "group_size": 16, "group_dim": "oc"},
               "model.layers.1.mlp.down_proj": {"act": "none", "bits": 4, "group_size": 16, "group_dim": "oc"}}
    return OutlierTuneConfig(act_bits=None, weight_bits=4, group_size=16, module_formats=formats).to_dict()


def test_w8a8_card_from_the_config_alone():
    card = model_card(w8a8_config(), CardInputs())
    text = card.text
    assert "**W8A8**" in text and "format version" in text
    assert "8-bit: static per-channel steps on 10 linears, dynamic per-token on 4" in text
    assert "| Quantized linears | 14 |" in text
    assert "64 sequences × 512 tokens (32768 tokens); source not recorded" in text
    assert "Not measured" in text and "%" not in text.split("## Quality")[1].split("##")[0]
    assert "Not recorded: the base model's license could not be read" in text
    assert "{{" not in str(card) and "}}" not in str(card)
    data = card.data
    assert data.license is None and data.base_model is None  # unknown: left out, not guessed
    assert data.tags == ["hf-outliertune", "quantized", "w8a8", "outliertune", "8-bit"]
    assert data.library_name == "transformers" and data.pipeline_tag == "text-generation"


def test_measured_perplexities_are_shown_exactly():
    card = model_card(w8a8_config(), CardInputs(evaluation=EVALUATION, eval_data="`wiki.test.raw`"))
    quality = card.text.split("## Quality")[1].split("## ")[0]
    assert "| base model (float) | 28.686 |" in quality
    assert "| this checkpoint (W8A8) | 28.744 | +0.20 % | 40 × 512 |" in quality
    assert "Perplexity on `wiki.test.raw`" in quality and "float32 weights" in quality


def test_quantized_perplexity_alone_has_no_comparison():
    card = model_card(w8a8_config(), CardInputs(evaluation={"ppl_quantized": EVALUATION["ppl_quantized"]}))
    assert "| this checkpoint (W8A8) | 28.744 | not measured | 40 × 512 |" in card.text


@pytest.mark.parametrize("evaluation, message", [
    ({"ppl_float": EVALUATION["ppl_float"]}, "no 'ppl_quantized'"),
    ({"ppl_quantized": {"perplexity": 3.0}}, "needs 'perplexity', 'windows' and 'seq_len'"),
    ({"ppl_quantized": {"perplexity": float("nan"), "windows": 1, "seq_len": 8}}, "finite number"),
    ({"ppl_float": {**EVALUATION["ppl_float"], "windows": 20}, "ppl_quantized": EVALUATION["ppl_quantized"]},
     "same windows"),
])
def test_malformed_evaluation_is_refused(evaluation, message):
    with pytest.raises(ValueError, match=message):
        model_card(w8a8_config(), CardInputs(evaluation=evaluation))


def test_license_and_language_carried_from_the_base_model_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\nlanguage:\n- fr\n---\n# base\n", encoding="utf-8")
    card = model_card(w8a8_config(), CardInputs(base_model=str(tmp_path)))
    assert card.data.license == "mit" and card.data.language == ["fr"]
    assert "`mit`, carried from the base model." in card.text
    assert card.data.base_model is None  # a local directory is not a Hub id
    explicit = model_card(w8a8_config(), CardInputs(base_model=str(tmp_path), license="apache-2.0"))
    assert explicit.data.license == "apache-2.0"


def test_license_carried_from_gguf_metadata(tmp_path):
    gguf = pytest.importorskip("gguf", reason="the gguf package (test extra) is needed to write a GGUF file")
    path = str(tmp_path / "base.Q4_1.gguf")
    writer = gguf.GGUFWriter(path, "llama")  # general.license / general.languages, as in the SmolLM2 GGUF
    writer.add_license("apache-2.0")
    writer.add_languages(["en"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    card = model_card(w8a8_config(), CardInputs(base_model="HuggingFaceTB/SmolLM2-135M-Instruct", base_source=path))
    assert card.data.license == "apache-2.0" and card.data.language == ["en"]
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.base_model_relation == "quantized"
    assert "weights loaded from `base.Q4_1.gguf`" in card.text


def test_weight_only_card():
    card = model_card(weight_only_config(), CardInputs(repo_id="org/tiny-w4"))
    text = card.text
    assert "# tiny-w4" in text and "**W4A16**" in text and "AdaDim" in text
    assert "4-bit asymmetric, groups of 16: AdaDim adaptive: per-IC in 1 and per-OC in 2 of 3 linears" in text
    assert "| Activations | not quantized" in text
    assert 'from_pretrained("org/tiny-w4", device_map="auto")' in text
    assert card.data.tags == ["hf-outliertune", "quantized", "w4a16", "adadim", "4-bit"]


def test_metadata_round_trips_through_the_hub_parser():
    card = model_card(w8a8_config(), CardInputs(base_model="org/base", license="apache-2.0", datasets=["wikitext"],
                                                tags=["smollm2"]))
    parsed = ModelCard(str(card))
    assert parsed.data.to_dict() == card.data.to_dict()
    assert parsed.data.datasets == ["wikitext"] and "smollm2" in parsed.data.tags


def test_config_without_module_formats_is_refused():
    with pytest.raises(ValueError, match="not quantized by hf-outliertune"):
        model_card(OutlierTuneConfig().to_dict(), CardInputs())
