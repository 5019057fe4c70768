#!/usr/bin/env bash
# Install xffl-cwl with its test tools into python3, and (as root) what the test facilities need:
# the Debian packages of SLURM, munge, sshd and podman, the Python environment their jobs run in,
# and the xffl-cwl container image (containers/build.sh).
# torch is pinned to the CPU build this machine keeps on disk; a GPU site installs its own
# CUDA/ROCm torch first (see README) and then runs `pip install -e .`.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install --quiet "torch==2.13.0" -e ".[test]"
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  bash scripts/facilities.sh install
  # The xffl-cwl image (podman, from a debootstrap base): kept when its inputs did not change
  bash containers/build.sh --save /var/tmp/xffl-cwl-build/images
else
  echo "install.sh: not root on Debian: skipped the SLURM test facilities (scripts/facilities.sh install)" >&2
fi
