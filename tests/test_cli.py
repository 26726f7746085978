"""The `hf-outliertune` command line on a tiny llama (a few seconds)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_models import sample_text, save_tiny  # tests/ is on sys.path (conftest.py)

from hf_outliertune.cli import build_parser, calibration_texts, main

SMALL = ["--num-samples", "4", "--seq-len", "32", "--eval-seq-len", "32", "--max-windows", "2"]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `quantize` run with --eval, --output and --json; its paths and exit code."""
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny("llama", str(root / "tiny"))
    text = root / "calib.txt"
    text.write_text(sample_text(20_000), encoding="utf-8")
    out, report = root / "out", root / "report.json"
    code = main(["quantize", "--model", model, "--calib", str(text), "--eval", str(text), *SMALL,
                 "--output", str(out), "--json", str(report)])
    return {"code": code, "text": text, "out": out, "report": report, "root": root}


def test_quantize_reports_both_perplexities(run: dict) -> None:
    assert run["code"] == 0
    figures = json.loads(run["report"].read_text())
    before, after = figures["ppl_float"], figures["ppl_quantized"]
    assert before["windows"] == after["windows"] == 2 and before["seq_len"] == 32
    assert 0 < before["perplexity"] and 0 < after["perplexity"]
    assert figures["ratio"] == pytest.approx(after["perplexity"] / before["perplexity"])
    assert figures["config"]["num_samples"] == 4 and "module_formats" not in figures["config"]


def test_output_reloads_quantized(run: dict) -> None:
    import hf_outliertune
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(run["out"]))
    assert isinstance(model.config.quantization_config, hf_outliertune.OutlierTuneConfig)
    assert any(isinstance(m, hf_outliertune.OutlierTuneLinear) for m in model.modules())


def test_eval_on_saved_checkpoint(run: dict, capsys: pytest.CaptureFixture) -> None:
    report = run["root"] / "eval.json"
    code = main(["eval", "--model", str(run["out"]), "--text", str(run["text"]), "--seq-len", "32",
                 "--max-windows", "2", "--json", str(report)])
    assert code == 0
    figures = json.loads(report.read_text())
    quantized = json.loads(run["report"].read_text())["ppl_quantized"]["perplexity"]
    assert figures["ppl"]["perplexity"] == pytest.approx(quantized, rel=1e-4)
    assert figures["setting"].startswith("W8A8 outliertune")
    assert "W8A8 outliertune" in capsys.readouterr().out


def test_missing_calib_file_is_a_one_line_error(tmp_path, capsys: pytest.CaptureFixture) -> None:
    missing = str(tmp_path / "nope.txt")
    assert main(["quantize", "--model", str(tmp_path), "--calib", missing]) == 2
    err = capsys.readouterr().err
    assert err == f"error: calibration file not found: {missing}\n"


def test_no_calibration_text_is_an_error(tmp_path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", "--model", str(tmp_path)]) == 2
    assert "pass --calib FILE" in capsys.readouterr().err


def test_calibration_falls_back_to_eval_file(tmp_path) -> None:
    text = tmp_path / "eval.txt"
    text.write_text("some evaluation text", encoding="utf-8")
    args = build_parser().parse_args(["quantize", "--eval", str(text)])
    assert calibration_texts(args) == ["some evaluation text"]


@pytest.mark.parametrize("argv", [["quantize", "--weight-bits", "4"], ["quantize", "--num-samples", "0"], []])
def test_invalid_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_python_dash_m() -> None:
    result = subprocess.run([sys.executable, "-m", "hf_outliertune", "quantize", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--weight-bits" in result.stdout and "--calib FILE" in result.stdout


def test_method_flags_reach_the_config():
    from hf_outliertune.cli import build_config, build_parser

    args = build_parser().parse_args(
        ["quantize", "--calib", "x", "--migration-alpha", "none", "--no-rotate", "--gptq-damp", "0.05",
         "--no-gptq-quantized-inputs", "--non-norm-activations", "static"]
    )
    cfg = build_config(args, ["text"])
    assert cfg.migration_alpha is None and cfg.rotate_dynamic is False and cfg.gptq_damp == 0.05
    assert cfg.gptq_quantized_inputs is False and cfg.non_norm_activations == "static"


def test_embedding_bits_flag_reaches_the_config_and_the_label():
    from hf_outliertune.cli import build_config, build_parser, describe_setting

    cfg = build_config(build_parser().parse_args(["quantize", "--calib", "x", "--embedding-bits", "8"]), ["text"])
    assert cfg.embedding_bits == 8 and "W8 embeddings + lm_head" in describe_setting(cfg)
    assert build_config(build_parser().parse_args(["quantize", "--calib", "x"]), ["text"]).embedding_bits is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--embedding-bits", "3"])


def test_bad_migration_alpha_is_an_argparse_error():
    from hf_outliertune.cli import build_parser

    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["quantize", "--migration-alpha", "2"])
    assert exc.value.code == 2
