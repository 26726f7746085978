"""Block-by-block offloaded calibration (offload.py, `calibration_device`): same result as the default path,
activations waiting on CPU and streamed per batch, blocks visiting the execution device one at a time."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn as nn
from transformers import AutoModelForCausalLM

import hf_outliertune
from hf_outliertune import OutlierTuneConfig
from hf_outliertune import offload as offload_module
from hf_outliertune.architectures import decoder_layers, resolve_arch
from hf_outliertune.offload import Offload, StreamedBatches, block_on, to_device

from conftest import logits_of, rel_err, small_config
from tiny_models import tiny_model

BATCH = 3  # 8 calibration sequences -> batches of 3, 3 and 2
META = torch.device("meta")


def _quantized(arch: str, device: str | None, **overrides) -> nn.Module:
    model = tiny_model(arch)
    hf_outliertune.quantize(model, small_config(calibration_batch_size=BATCH, **overrides), device=device)
    return model


def _assert_same_quantized_model(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"differ: {different[:5]}"
    fa, fb = a.config.quantization_config.module_formats, b.config.quantization_config.module_formats
    assert fa == fb and fa


WO = dict(act_bits=None, weight_bits=4, group_size=16, group_dim="adaptive", weight_algorithm="gptq", gptq_damp=0.01)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        ("llama", {}),  # absmax weights
        ("llama", {"weight_algorithm": "gptq"}),  # GPTQ on quantized inputs: moments, least squares
        ("llama", {"weight_algorithm": "gptq", "gptq_quantized_inputs": False, "act_clip": "mse"}),  # float Hessian
        ("gemma3_text", {"weight_algorithm": "gptq"}),  # alternate blocks get different masks
        ("llama", WO),  # AdaDim weight-only, module-output criterion
        ("llama", dict(WO, weight_algorithm="rtn", group_dim="oc", weight_clip="minmax")),  # data-free RTN
    ],
    ids=["w8a8-absmax", "w8a8-gptq", "w8a8-gptq-float-hessian", "gemma3-gptq", "adadim-w4", "rtn-data-free"],
)
def test_offloaded_path_is_bit_identical_to_default(arch, overrides):
    """device='cpu' runs the whole offloaded machinery (capture with moves, streamed batches, blocks moved in
    and out, outputs stored) where every move is a no-op, so any change of the math shows up exactly."""
    default = _quantized(arch, None, **overrides)
    offloaded = _quantized(arch, "cpu", **overrides)
    assert default.config.quantization_config.calibration_device is None
    assert offloaded.config.quantization_config.calibration_device == "cpu"
    _assert_same_quantized_model(default, offloaded)


def test_quantize_on_load_with_calibration_device_matches(tiny_dir, llama_ckpt, eval_ids):
    """from_pretrained(..., quantization_config=OutlierTuneConfig(calibration_device=...)) takes the offloaded
    path and gives exactly the model the default quantize-on-load gives (the `llama_ckpt` fixture)."""
    _, reference_logits = llama_ckpt
    config = small_config(calibration_device="cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=config, dtype=torch.float32)
    assert model.config.quantization_config.calibration_device == "cpu"
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(logits_of(model, eval_ids), reference_logits)


class _Recorder:
    """Instruments `Offload`: the activations handed to each block, its outputs, and every block move."""

    def __init__(self, monkeypatch, layers: nn.ModuleList) -> None:
        self.block_inputs: list[list[torch.Tensor]] = []
        self.block_outputs: list[list[torch.Tensor]] = []
        self.streamed: list[torch.Tensor] = []  # hidden batches as they reach the execution device
        self.moves: list[int] = []  # index of the block each `.to()` call moved
        self.resident: list[int] = []  # blocks currently on the execution device
        self.max_resident = 0
        batches, run, to = Offload.batches, Offload.run, nn.Module.to
        index = {id(layer): i for i, layer in enumerate(layers)}

        def record_batches(off, hidden, kwargs):
            out = batches(off, hidden, kwargs)
            if not off.active:
                assert isinstance(out, list)
                return out
            assert isinstance(out, StreamedBatches)
            self.block_inputs.append(list(hidden))
            return _Tap(out, self.streamed)

        def record_run(off, layer, inputs):
            out = run(off, layer, inputs)
            if off.active:
                self.block_outputs.append(out)
            return out

        def record_to(module, *args, **kwargs):
            if id(module) in index:  # a block: entering and leaving the device alternate
                i = index[id(module)]
                self.moves.append(i)
                if i in self.resident:
                    self.resident.remove(i)
                else:
                    self.resident.append(i)
                self.max_resident = max(self.max_resident, len(self.resident))
            return to(module, *args, **kwargs)

        monkeypatch.setattr(Offload, "batches", record_batches)
        monkeypatch.setattr(Offload, "run", record_run)
        monkeypatch.setattr(nn.Module, "to", record_to)


class _Tap:
    """Passes a `StreamedBatches` through, noting each hidden batch it yields."""

    def __init__(self, inner: StreamedBatches, seen: list[torch.Tensor]) -> None:
        self.inner, self.seen = inner, seen

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, index):
        return _Tap(self.inner[index], self.seen)

    def __iter__(self):
        for hidden, kwargs in self.inner:
            self.seen.append(hidden)
            yield hidden, kwargs


@pytest.mark.parametrize("overrides", [{}, WO], ids=["w8a8", "adadim-w4"])
def test_activations_wait_on_cpu_and_stream_per_batch(monkeypatch, overrides):
    model = tiny_model("llama")
    layers = decoder_layers(model, resolve_arch(model))
    rec = _Recorder(monkeypatch, layers)
    hf_outliertune.quantize(model, small_config(calibration_batch_size=BATCH, **overrides), device="cpu")

    n = len(layers)
    assert len(rec.block_inputs) == len(rec.block_outputs) == n
    for hidden in (*rec.block_inputs, *rec.block_outputs):
        # per block: one CPU tensor per calibration batch, never one big tensor nor a device copy
        assert [h.shape[0] for h in hidden] == [3, 3, 2]
        assert all(h.device.type == "cpu" and h.shape[-1] == model.config.hidden_size for h in hidden)
    for i in range(1, n):  # block i reads exactly what block i-1 produced
        assert all(a is b for a, b in zip(rec.block_inputs[i], rec.block_outputs[i - 1]))
    # every pass over the calibration data streamed the batches one at a time, in order
    assert rec.streamed and len(rec.streamed) % 3 == 0
    assert [h.shape[0] for h in rec.streamed] == [3, 3, 2] * (len(rec.streamed) // 3)


def test_blocks_visit_the_device_one_at_a_time_and_return(monkeypatch):
    model = tiny_model("llama")
    layers = decoder_layers(model, resolve_arch(model))
    rec = _Recorder(monkeypatch, layers)
    hf_outliertune.quantize(model, small_config(calibration_batch_size=BATCH), device="cpu")
    # the capture pass runs no block (nothing moves); then each block goes to the device and back, in turn
    assert rec.moves == [0, 0, 1, 1]
    assert rec.max_resident == 1 and rec.resident == []
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_default_path_moves_and_copies_nothing(monkeypatch):
    model = tiny_model("llama")
    layers = decoder_layers(model, resolve_arch(model))
    calls = collections.Counter()
    real = offload_module.to_device
    monkeypatch.setattr(offload_module, "to_device", lambda *a, **k: calls.update(["to_device"]) or real(*a, **k))
    rec = _Recorder(monkeypatch, layers)
    hf_outliertune.quantize(model, small_config(calibration_batch_size=BATCH))
    assert rec.moves == [] and calls["to_device"] == 0
    assert rec.block_inputs == []  # `Offload.batches` returned the plain list without streaming (not recorded)


def test_streamed_batches_are_lazy_and_leave_the_cpu_copy():
    hidden = [torch.randn(3, 5, 4), torch.randn(2, 5, 4)]
    mask = torch.ones(5, 5, dtype=torch.bool)
    kwargs = [{"attention_mask": mask, "position_embeddings": (torch.randn(3, 5, 2), torch.randn(3, 5, 2)),
               "use_cache": False}] * 2
    batches = StreamedBatches(hidden, kwargs, META)
    it = iter(batches)
    h0, kw0 = next(it)  # one batch on the device; the next one is not copied yet
    assert h0.device == META and h0.shape == (3, 5, 4)
    assert kw0["attention_mask"].device == META and kw0["position_embeddings"][1].device == META
    assert kw0["use_cache"] is False
    assert [h.device.type for h in hidden] == ["cpu", "cpu"]  # the stored activations stay put
    assert [h.shape[0] for h, _ in batches] == [3, 2]  # iterable again
    assert len(batches) == 2 and [h.shape[0] for h, _ in batches[:1]] == [3]


def test_to_device_keeps_shared_tensors_shared():
    Pair = collections.namedtuple("Pair", "cos sin")
    shared = torch.ones(4)
    obj = {"a": shared, "b": [shared, Pair(shared, torch.zeros(2))], "flag": True, "none": None}
    memo: dict = {}
    out = to_device(obj, META, memo)
    assert out["a"].device == META and out["a"] is out["b"][0] is out["b"][1].cos
    assert isinstance(out["b"][1], Pair) and out["b"][1].sin.device == META
    assert out["flag"] is True and out["none"] is None
    assert obj["a"] is shared and shared.device.type == "cpu"  # the input is not modified


def test_block_on_moves_there_and_back_and_inactive_does_nothing(monkeypatch):
    block = nn.Sequential(nn.Linear(4, 4))
    seen = []
    to = nn.Module.to
    monkeypatch.setattr(nn.Module, "to", lambda m, *a, **k: seen.append((m, a)) or to(m, *a, **k))
    with block_on(block, torch.device("cpu")):
        assert len(seen) == 1
    assert [(m is block, a) for m, a in seen] == [(True, (torch.device("cpu"),))] * 2
    seen.clear()
    with pytest.raises(RuntimeError):
        with block_on(block, torch.device("cpu")):
            raise RuntimeError("calibration failed")
    assert len(seen) == 2  # moved back even when the block's calibration fails
    seen.clear()
    with block_on(block, None):  # inactive: no move at all
        pass
    assert seen == []


@pytest.mark.parametrize("tied", [False, True])
def test_capture_moves_the_embeddings_but_neither_blocks_nor_an_untied_head(monkeypatch, tied):
    from hf_outliertune import calibration

    model = tiny_model("llama")
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    layers = decoder_layers(model, resolve_arch(model))
    names = {id(m): n for n, m in model.named_modules()}
    calls = []
    monkeypatch.setattr(calibration, "_set_tensor",
                        lambda module, name, is_param, tensor, device: calls.append((f"{names[id(module)]}.{name}", device)))
    with calibration._non_block_modules_on(model, layers, META):
        moved = [n for n, _ in calls]
        assert all(d == META for _, d in calls)
    assert sorted(moved) == ["model.embed_tokens.weight", "model.norm.weight", "model.rotary_emb.inv_freq",
                             "model.rotary_emb.original_inv_freq"]  # a tied head moves with the embedding
    assert [n for n, _ in calls[len(moved):]] == moved[::-1]  # each one back, to where it was
    assert all(d.type == "cpu" for _, d in calls[len(moved):])


@pytest.mark.parametrize("device", ["gpu", "meta", "cuda:x", "", 3])
def test_invalid_device_is_refused_clearly(device):
    with pytest.raises(ValueError, match="calibration_device"):
        OutlierTuneConfig(calibration_device=device)
    config = small_config()
    with pytest.raises(ValueError, match="device"):
        hf_outliertune.quantize(tiny_model("llama"), config, device=device)
    assert config.calibration_device is None  # the config is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_cuda_is_refused_before_any_work(tiny_dir):
    config = small_config()
    with pytest.raises(ValueError, match="cannot be used on this machine"):
        hf_outliertune.quantize(tiny_model("llama"), config, device="cuda")
    with pytest.raises(ValueError, match="cannot be used on this machine"):  # quantize on load: before loading
        AutoModelForCausalLM.from_pretrained(tiny_dir("llama"), quantization_config=small_config(calibration_device="cuda"))


def test_config_field_round_trips_and_old_configs_default_to_none():
    cfg = OutlierTuneConfig(calibration_device=torch.device("cuda", 1))
    assert cfg.calibration_device == "cuda:1"  # stored as a JSON-safe string
    d = cfg.to_dict()
    assert d["calibration_device"] == "cuda:1"
    assert OutlierTuneConfig.from_dict(d).calibration_device == "cuda:1"
    del d["calibration_device"]  # a config.json written before the field existed
    assert OutlierTuneConfig.from_dict(d).calibration_device is None


def test_weights_left_on_meta_by_accelerate_are_refused():
    model = tiny_model("llama")
    model.model.layers[1].mlp.to(META)  # what a device_map mixing GPU and 'cpu' offload leaves behind
    with pytest.raises(ValueError, match="device_map='cpu'"):
        hf_outliertune.quantize(model, small_config())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_offload_of_a_cpu_model():
    """The real case: model on CPU, blocks calibrated on the GPU; the model ends on CPU, quantized, and close to
    the CPU-calibrated model (not bit-identical: GPU kernels round differently)."""
    ids = torch.randint(0, 500, (2, 32))
    reference = _quantized("llama", None, weight_algorithm="gptq")
    torch.cuda.reset_peak_memory_stats()
    model = _quantized("llama", "cuda", weight_algorithm="gptq")
    assert {p.device.type for p in (*model.parameters(), *model.buffers())} == {"cpu"}
    assert torch.cuda.max_memory_allocated() > 0
    assert rel_err(logits_of(reference, ids), logits_of(model, ids)) < 0.05
