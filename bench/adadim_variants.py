"""One weight-only AdaDim setting with variants of the layout criterion, for the ablations in docs/accuracy.md.

The table script (`accuracy_weight_only.py`) runs the shipped method. This one answers "what if": it quantizes
the float model once with `--cfg` (OutlierTuneConfig keywords as JSON) and, for `group_dim="adaptive"`, lets
the per-layer choice be judged differently by patching the pipeline for this process only:

- `--criterion module` (shipped, the official AdaDim code's): attention/MLP module output for q/k/v and gate/up;
- `--criterion layer`: every linear's own output, tr(ΔW H ΔWᵀ);
- `--criterion block`: the whole decoder block's output;
- `--margin m`: per-IC only where its error is below (1 − m) × per-OC's.

    python bench/adadim_variants.py --cfg '{"weight_bits": 3, "group_size": 64, "weight_algorithm": "rtn",
        "group_dim": "adaptive"}' --criterion block --out variant.json

Prints one RESULT line (WikiText-2 and PTB test perplexity, layers per-IC) and writes the formats with every
layer's criterion values to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import hf_outliertune
import hf_outliertune.weight_only_pipeline as pipeline
from hf_outliertune import adadim
from hf_outliertune.evaluation import perplexity
from hf_outliertune.models import load_float_model


def patch_criterion(criterion: str, margin: float) -> None:
    """Swap the per-layer layout choice of this process's pipeline for the requested variant."""
    if margin:
        adadim.pick_layout = lambda errors: "ic" if errors["ic"] < (1 - margin) * errors["oc"] else "oc"
    if criterion == "layer":
        pipeline._criterion_module = lambda names: None
    elif criterion == "block":
        stage = pipeline._quantize_stage  # module name "" is the decoder layer itself
        pipeline._quantize_stage = lambda layer, names, _module, *args, **kw: stage(layer, names, "", *args, **kw)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True, help="OutlierTuneConfig keywords as JSON (act_bits=None is implied)")
    parser.add_argument("--criterion", default="module", choices=["module", "layer", "block"])
    parser.add_argument("--margin", type=float, default=0.0)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    patch_criterion(args.criterion, args.margin)

    def read(rel: str) -> str:
        with open(os.path.join(args.data, rel), encoding="utf-8") as f:
            return f.read()

    model, tokenizer = load_float_model(args.model)
    model = model.to(args.device)
    kwargs = dict(act_bits=None, dataset=[read("wikitext-2-raw/wiki.valid.raw")], num_samples=32, seq_len=512,
                  gptq_damp=0.01)
    kwargs.update(json.loads(args.cfg))
    cfg = hf_outliertune.OutlierTuneConfig(**kwargs)
    start = time.perf_counter()
    hf_outliertune.quantize(model, cfg, tokenizer)
    seconds = time.perf_counter() - start
    result = {"cfg": args.cfg, "criterion": args.criterion, "margin": args.margin, "quantize_s": seconds,
              "formats": cfg.module_formats}
    for key, rel in (("wikitext2", "wikitext-2-raw/wiki.test.raw"), ("ptb", "ptb/ptb.test.txt")):
        result[key] = perplexity(model, tokenizer, read(rel), 512, args.max_windows).perplexity
    per_ic = [n for n, f in cfg.module_formats.items() if f["group_dim"] == "ic"]
    print(f"RESULT {args.cfg} criterion={args.criterion} margin={args.margin}: WikiText-2 {result['wikitext2']:.3f} "
          f"PTB {result['ptb']:.3f} per-IC {len(per_ic)}/{len(cfg.module_formats)} quantize {seconds:.0f}s")
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
