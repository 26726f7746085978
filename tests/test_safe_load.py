"""A checkpoint saved by hf-outliertune never loads silently as a float model of garbage.

transformers has no plugin entry points, so the package installs a start-up hook (`hf_outliertune-autoload.pth`
→ `hf_outliertune_autoload`) that registers the quantizer the moment a config names it. These tests run plain
transformers code in fresh processes that never `import hf_outliertune`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_outliertune import FORMAT_VERSION
from hf_outliertune.checkpoint import CheckpointError

from conftest import NUM_THREADS, rel_err

REINSTALL = "the start-up hook is missing: reinstall the package (bash .ci/setup.sh, or pip install -e .)"

_PLAIN_LOAD = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
from transformers import AutoModelForCausalLM
ckpt, ids_path, out_path, *bad = sys.argv[2:]
imported_before = "hf_outliertune" in sys.modules
model = AutoModelForCausalLM.from_pretrained(ckpt)
with torch.no_grad():
    logits = model(input_ids=torch.load(ids_path), use_cache=False).logits
errors = {}
for path in bad:
    try:
        AutoModelForCausalLM.from_pretrained(path)
        errors[path] = None
    except Exception as err:
        errors[path] = f"{type(err).__name__}: {err}"
torch.save({
    "imported_before": imported_before,
    "layer_type": type(model.model.layers[0].self_attn.q_proj).__name__,
    "logits": logits,
    "errors": errors,
}, out_path)
"""


def _run(code: str, *args: str, cwd: str, **env: str) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", **env)
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=300)


def _plain_load(ckpt: str, ids: torch.Tensor, tmp_path, *bad: str, **env: str) -> dict:
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(ids, ids_path)
    proc = _run(_PLAIN_LOAD, str(NUM_THREADS), ckpt, ids_path, out_path, *bad, cwd=str(tmp_path), **env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return torch.load(out_path)


def _copy(ckpt: str, dst) -> str:
    return shutil.copytree(ckpt, str(dst))


def test_hook_is_installed_and_imports_nothing_heavy(tmp_path):
    """The .pth file armed the hook at start-up without importing torch or transformers (no start-up cost)."""
    proc = _run("import sys, hf_outliertune_autoload as h; "
                "print(h._FINDER in sys.meta_path, 'torch' in sys.modules, 'transformers' in sys.modules)",
                cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    armed, torch_loaded, transformers_loaded = proc.stdout.split()
    assert armed == "True", REINSTALL
    assert (torch_loaded, transformers_loaded) == ("False", "False")


def test_plain_load_without_import_is_quantized_and_checked(llama_ckpt, eval_ids, tmp_path):
    ckpt, logits = llama_ckpt
    truncated = _copy(ckpt, tmp_path / "truncated")
    weights = os.path.join(truncated, "model.safetensors")
    with open(weights, "r+b") as f:
        f.truncate(os.path.getsize(weights) // 2)
    newer = _copy(ckpt, tmp_path / "newer")
    with open(os.path.join(newer, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"]["format_version"] = FORMAT_VERSION + 1
    with open(os.path.join(newer, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f)

    out = _plain_load(ckpt, eval_ids, tmp_path, truncated, newer)
    assert out["imported_before"] is False
    assert out["layer_type"] == "OutlierTuneLinear", REINSTALL
    assert torch.equal(out["logits"], logits)
    assert "CheckpointError" in out["errors"][truncated] and "not a readable safetensors file" in out["errors"][truncated]
    assert "pip install -U hf-outliertune" in out["errors"][newer]


def test_without_the_hook_the_same_load_is_garbage(llama_ckpt, eval_ids, tmp_path):
    """The hazard the hook prevents: with it turned off, transformers casts the int8 weights to floats."""
    ckpt, logits = llama_ckpt
    out = _plain_load(ckpt, eval_ids, tmp_path, HF_OUTLIERTUNE_AUTOLOAD="0")
    assert out["layer_type"] == "Linear"
    assert rel_err(logits, out["logits"]) > 0.5


def test_a_broken_install_fails_loudly(llama_ckpt, tmp_path):
    ckpt, _ = llama_ckpt
    broken = tmp_path / "site" / "hf_outliertune"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text("raise ImportError('simulated broken installation')\n")
    code = "from transformers import AutoModelForCausalLM; import sys; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    proc = _run(code, ckpt, cwd=str(tmp_path), PYTHONPATH=str(tmp_path / "site"))
    assert proc.returncode != 0
    assert "simulated broken installation" in proc.stderr
    assert "pip install -U hf-outliertune" in proc.stderr


@pytest.mark.parametrize("content", ["state_dict", "garbage"])
def test_only_safetensors_are_read(llama_ckpt, tmp_path, content):
    """A pickled checkpoint is refused before it is opened: garbage bytes give the same error, not an unpickling one."""
    ckpt, _ = llama_ckpt
    pickled = _copy(ckpt, tmp_path / "pickled")
    weights = os.path.join(pickled, "model.safetensors")
    target = os.path.join(pickled, "pytorch_model.bin")
    if content == "state_dict":
        torch.save(load_file(weights), target)
    else:
        with open(target, "wb") as f:
            f.write(os.urandom(4096))
    os.remove(weights)
    with pytest.raises(CheckpointError, match="not a safetensors file; hf-outliertune only reads safetensors"):
        AutoModelForCausalLM.from_pretrained(pickled)
