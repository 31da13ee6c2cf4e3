#!/usr/bin/env bash
# The prepared GPU check of the Triton step (see scripts/gpu_check.py for what it writes):
#   bash scripts/gpu_check.sh OUT_DIR [--strict] [--skip tests,steps,lora_run,cpu_offload]
# Run from anywhere; it runs in the repository root with the python on the PATH (or $PYTHON).
# Exit status: 0 pass (or no CUDA device), 1 a part failed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-gpu_check_out}"
shift || true
cd "$root"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" scripts/gpu_check.py --out "$out" "$@"
