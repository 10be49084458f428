#!/usr/bin/env bash
# The CUDA paths on one GPU in under 10 minutes, printed as one table (bench/gpu_check.py says what is
# checked): bf16 BLD of a 1B-shaped random parent in groups, planned vs measured memory, the measured profile
# against the roofline, and the BLD step's TFLOP/s against the GPU's peak. Not part of the test suite.
#
#   scripts/gpu_check.sh                  # uses .venv if there is one, else makes it (torch with CUDA from pip)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q torch
  .venv/bin/pip install -q -e .
fi
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: this check needs one GPU')"
exec .venv/bin/python bench/gpu_check.py "$@"
