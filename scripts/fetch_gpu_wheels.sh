#!/usr/bin/env bash
# Run on an online host: downloads the wheels an offline GPU host lacks (Python 3.12,
# x86-64) into .whl/, which scripts/install.sh --offline installs. Today only zstandard.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "zstandard>=0.22"
ls .whl
