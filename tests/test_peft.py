"""LoRA (PEFT) on quantized tiny models: training, gradient checkpointing, adapter reload, merge, Trainer."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_outliertune import OutlierTuneLinear
from hf_outliertune.peft_integration import QUANTIZED_LAYERS, QuantizedLoraLinear
from hf_outliertune.adadim import expand_groups
from hf_outliertune.quant_math import round_clamp
from hf_outliertune.training import prepare_model_for_training

from conftest import NUM_THREADS, logits_of, rel_err, small_config
from tiny_models import tiny_model

MODES = {
    "w8a8": dict(),
    "w6a6": dict(weight_bits=6, act_bits=6),
    "w4": dict(act_bits=None, weight_bits=4, group_size=32, group_dim="adaptive", weight_algorithm="rtn"),
    "w4_ic": dict(act_bits=None, weight_bits=4, group_size=32, group_dim="ic", weight_algorithm="rtn"),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def ckpt(tiny_dir, tmp_path_factory):
    """`ckpt(mode)`: a saved quantized tiny Llama (quantized once per mode)."""
    cache: dict[str, str] = {}

    def get(mode: str) -> str:
        if mode not in cache:
            model = AutoModelForCausalLM.from_pretrained(
                tiny_dir("llama"), quantization_config=small_config(**MODES[mode]), dtype=torch.float32
            )
            cache[mode] = str(tmp_path_factory.mktemp(f"peft_{mode}"))
            model.save_pretrained(cache[mode])
        return cache[mode]

    return get


def quantized_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the quantized layers, cloned, by name in the unwrapped model."""
    return {
        f"{name.removeprefix('base_model.model.').replace('.base_layer', '')}.{key}": t.detach().clone()
        for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)
        for key, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)] if t is not None
    }


def lora_model(path: str, init_lora_weights: bool = True, **prepare_kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    model = prepare_model_for_training(AutoModelForCausalLM.from_pretrained(path), **prepare_kwargs)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=init_lora_weights)
    return get_peft_model(model, config)


def lora_grads(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", ["w8a8", "w6a6", "w4"])
def test_lora_steps_reduce_loss_and_leave_the_base_quantized(mode, ckpt, eval_ids):
    model = lora_model(ckpt(mode))
    base = quantized_tensors(model)
    ids = eval_ids[:1, :64]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # the compute dtype
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    after = quantized_tensors(model)
    assert all(torch.equal(base[k], after[k]) for k in base)  # frozen base: codes, scales, offsets, biases
    assert any(not t.is_floating_point() for t in after.values())  # integer codes
    for m in model.modules():
        if isinstance(m, QUANTIZED_LAYERS):
            assert all(not p.requires_grad and p.grad is None for p in m.parameters())


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(use_reentrant, ckpt, eval_ids):
    ids = eval_ids[:1, :48]
    plain = lora_grads(lora_model(ckpt("w8a8"), init_lora_weights=False, use_gradient_checkpointing=False), ids)
    model = lora_model(ckpt("w8a8"), init_lora_weights=False,
                       gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.base_model.model.is_activation_checkpointing
    checkpointed = lora_grads(model, ids)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * len(TARGETS) * 2
    # the reentrant first pass runs without autograd, so its norms emit int8 codes (fused) instead of floats
    for name in plain:
        assert rel_err(plain[name], checkpointed[name]) < (1e-4 if use_reentrant else 1e-6), name


def test_adapter_sees_the_same_input_from_fused_codes_and_floats(ckpt, eval_ids):
    """Inference: fused norms hand static layers int8 codes; the adapters must read the same float input."""
    model = lora_model(ckpt("w8a8"), init_lora_weights=False).eval()
    inference = logits_of(model, eval_ids)  # no autograd: fused norm+quant path
    with torch.enable_grad():
        training_path = model(input_ids=eval_ids, use_cache=False).logits.detach()
    assert any("_outliertune_fusion" in m.__dict__ for m in model.modules())
    assert rel_err(training_path, inference) < 1e-4


_FRESH_PROCESS = r"""
import sys, torch
torch.set_num_threads(int(sys.argv[1]))
import hf_outliertune
from peft import PeftModel
from transformers import AutoModelForCausalLM
ckpt, adapter, ids_path, out_path = sys.argv[2:6]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(ckpt), adapter).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_path), use_cache=False).logits, out_path)
"""


@pytest.mark.parametrize("mode", ["w8a8", "w4"])
def test_adapter_reloads_in_a_fresh_process(mode, ckpt, eval_ids, tmp_path):
    model = lora_model(ckpt(mode), init_lora_weights=False).eval()
    logits = logits_of(model, eval_ids)
    model.save_pretrained(tmp_path / "adapter")
    ids_path, out_path = str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")
    torch.save(eval_ids, ids_path)
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH_PROCESS, str(NUM_THREADS), ckpt(mode), str(tmp_path / "adapter"), ids_path,
         out_path], cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert torch.equal(torch.load(out_path), logits)


def step_per_element(base: torch.nn.Module) -> torch.Tensor:
    """The quantization step of every stored weight element `(out, in)` (fp32)."""
    if isinstance(base, OutlierTuneLinear):
        return base.weight_scale.float()[:, None].expand(base.out_features, base.in_features)
    shape = (base.out_features, base.in_features)
    return expand_groups(base.weight_scale, base.group_size, base.group_dim, shape)


@pytest.mark.parametrize("mode, layer_name", [
    ("w8a8", "model.layers.0.self_attn.q_proj"),  # static input with an offset
    ("w8a8", "model.layers.0.mlp.down_proj"),  # dynamic input, Hadamard rotation inside the layer
    ("w4", "model.layers.0.self_attn.q_proj"),  # weight-only groups along input channels (AdaDim per-OC)
    ("w4_ic", "model.layers.0.mlp.down_proj"),  # weight-only groups along output channels (per-IC)
])
def test_merge_requantizes_w_eff_plus_delta_and_unmerge_restores(mode, layer_name, ckpt):
    model = lora_model(ckpt(mode), init_lora_weights=False)
    layer = model.base_model.model.get_submodule(layer_name)
    assert isinstance(layer, QuantizedLoraLinear)
    base = layer.get_base_layer()
    static = getattr(base, "act_mode", None) == "static"
    torch.manual_seed(1)
    x = torch.randn(5, base.in_features) * (30 if static else 0.1)
    # an adapter of about one quantization step: some groups keep their grid, others outgrow it
    layer.scaling["default"] *= (step_per_element(base).median() / layer.effective_delta("default").std()).item()
    delta = layer.effective_delta("default")
    with torch.no_grad():
        # the adapter is an additive change of W_eff, in the coordinates W_eff acts on; a static layer's
        # adapter reads the activation codes the integer GEMM multiplies
        x_in = round_clamp(x - base.input_offset, base.act_bits) if static else x
        torch.testing.assert_close(layer(x) - base(x), x_in @ delta.T)
        unmerged, without_adapter = layer(x), base(x)
        target = base.effective_weight() + delta
        stored = {k: getattr(base, k).clone() for k in layer.quantized_tensors}
        layer.merge()
        regridded = (base.weight_scale != stored["weight_scale"]).float().mean()
        assert 0 < regridded < 1  # both paths: rows/groups that keep their step, and ones that outgrow it
        # stochastic rounding: less than one (possibly enlarged) step per element (row norms: the Hadamard
        # rotation mixes the elements of a row but keeps its norm) ...
        err = base.effective_weight() - target
        assert (err.norm(dim=1) <= step_per_element(base).norm(dim=1) * 1.001).all()
        # ... and unbiased: the errors average out over the many elements of the layer
        assert err.mean().abs() < 0.02 * step_per_element(base).mean()
        assert not any(getattr(base, k).is_floating_point() for k in ("weight", "qweight") if hasattr(base, k))
        # an adapter of one step is at the resolution of the grid, yet the merged layer keeps most of it
        assert rel_err(unmerged, layer(x)) < 0.75 * rel_err(unmerged, without_adapter)
        layer.unmerge()
        assert all(torch.equal(getattr(base, k), v) for k, v in stored.items())
        assert torch.equal(layer(x), unmerged)


@pytest.mark.parametrize("mode", ["w8a8", "w4"])
def test_merging_a_zero_adapter_keeps_the_codes(mode, ckpt):
    model = lora_model(ckpt(mode))  # default init: B = 0
    before = quantized_tensors(model)
    with pytest.warns(UserWarning, match="re-quantizes"):
        merged = model.merge_and_unload()
    after = quantized_tensors(merged)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_merge_and_unload_gives_a_quantized_model_that_saves_and_reloads(ckpt, eval_ids, tmp_path):
    model = lora_model(ckpt("w8a8"), init_lora_weights=False).eval()
    unmerged = logits_of(model, eval_ids)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, QuantizedLoraLinear) for m in merged.modules())
    assert sum(isinstance(m, OutlierTuneLinear) for m in merged.modules()) == 14
    merged_logits = logits_of(merged, eval_ids)
    without_adapter = logits_of(AutoModelForCausalLM.from_pretrained(ckpt("w8a8")), eval_ids)
    # lossy, but the merged model is much closer to the adapted model than the base is
    assert rel_err(unmerged, merged_logits) < 0.2 * rel_err(unmerged, without_adapter)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits_of(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), eval_ids), merged_logits)


def test_all_linear_targets_every_quantized_layer(ckpt):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(ckpt("w8a8")), LoraConfig(target_modules="all-linear"))
    wrapped = [n for n, m in model.named_modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == 14 and not any("lm_head" in n for n in wrapped)


def test_prepare_keeps_quantized_tensors_and_adapters_use_the_compute_dtype(ckpt, eval_ids):
    model = AutoModelForCausalLM.from_pretrained(ckpt("w8a8"), dtype=torch.bfloat16)
    base = quantized_tensors(model)
    model = prepare_model_for_training(model)
    after = quantized_tensors(model)
    assert all(torch.equal(base[k], after[k]) and base[k].dtype == after[k].dtype for k in base)
    assert {t.dtype for t in after.values()} >= {torch.int8, torch.float32, torch.bfloat16}  # codes, scales, biases
    assert model.model.norm.weight.dtype == torch.float32 and model.is_activation_checkpointing
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=TARGETS), autocast_adapter_dtype=False)
    assert {p.dtype for p in peft_model.parameters() if p.requires_grad} == {torch.bfloat16}
    grads = lora_grads(peft_model, eval_ids[:1, :32])
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_trainer_trains_the_peft_model(ckpt, eval_ids, tmp_path):
    model = lora_model(ckpt("w8a8"))
    rows = eval_ids[:, :64]
    data = [{"input_ids": r, "labels": r} for r in rows.repeat(2, 1)]
    args = TrainingArguments(str(tmp_path), max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
                             activation_checkpointing=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=data).train()
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # zero-initialized, so nonzero means the optimizer stepped


def test_unsupported_requests_get_clear_errors(ckpt):
    model = AutoModelForCausalLM.from_pretrained(ckpt("w8a8"))
    with pytest.raises(ValueError, match="plain LoRA only"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], use_dora=True))
    model = AutoModelForCausalLM.from_pretrained(ckpt("w8a8"))
    with pytest.raises(ValueError, match="lora_bias"):
        get_peft_model(model, LoraConfig(target_modules=["q_proj"], lora_bias=True))
    with pytest.raises(ValueError, match="no hf-outliertune quantized layers"):
        prepare_model_for_training(tiny_model("llama"))


def test_mixed_adapter_batch_and_disabled_adapters(ckpt, eval_ids):
    model = lora_model(ckpt("w8a8"), init_lora_weights=False).eval()
    torch.manual_seed(2)
    model.add_adapter("other", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights=False))
    ids = eval_ids[:, :32]
    mixed = model(input_ids=ids, adapter_names=["other", "__base__"]).logits.detach()
    model.set_adapter("other")
    with torch.no_grad():
        other = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
    assert rel_err(base[1], other[1]) > 1e-3  # the adapter changes the output
    assert torch.allclose(mixed[0], other[0], atol=1e-5) and torch.allclose(mixed[1], base[1], atol=1e-5)
