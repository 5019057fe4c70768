#!/usr/bin/env bash
# Install xffl-cwl with its test tools into the current Python.
# torch is pinned to the CPU build this machine keeps on disk; a GPU site installs its own
# CUDA/ROCm torch first (see README) and then runs `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0" -e ".[test]"
