#!/usr/bin/env bash
# One-command set-up for pgolf_kernels.
#   bash scripts/install.sh            # online machine (CPU or GPU): torch if missing, deps, build
#   bash scripts/install.sh --offline  # GPU host without internet: torch/triton preinstalled;
#                                      # installs wheels found in .whl/ (e.g. zstandard) and builds
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [[ "${1:-}" == "--offline" ]]; then
  if compgen -G ".whl/*.whl" > /dev/null; then
    "$PY" -m pip install -q --no-index --no-deps .whl/*.whl
  fi
  "$PY" -m pip install --no-build-isolation --no-deps -e .
  "$PY" -m pgolf_kernels.build_info
  exit 0
fi
if ! "$PY" -c "import torch" 2>/dev/null; then
  # A CPU-only host resolves this to a CPU build (a local wheel index where one is configured).
  "$PY" -m pip install torch==2.13.0
fi
"$PY" -m pip install -r requirements.txt
"$PY" -m pip install --no-build-isolation -e .
# pip hides setup.py's output; say here what was built and what was skipped, and why
"$PY" -m pgolf_kernels.build_info
