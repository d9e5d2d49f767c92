#!/usr/bin/env bash
# Download the pure-Python wheels the lent GPU machine lacks (it has no network and no diffusers) into .whl/,
# which is git-ignored and travels with the device tool's `carry: [".whl"]`; gpu_suite.sh installs them.
# pytest-xdist (+ execnet) lets the suite's test stage compile the kernels' specialisations in parallel workers.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  diffusers==0.42.1 importlib_metadata "pytest-xdist>=3.6,<4" "execnet>=2.1"
ls -la .whl
