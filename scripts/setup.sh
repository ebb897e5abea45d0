#!/usr/bin/env bash
# One-time setup on Debian/Ubuntu with Python 3.11: OSMesa for CPU rendering, a virtual
# environment in .venv with pinned dependencies, and vlarl installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
# VLARL_DEV=0: runtime dependencies only (the Docker images); 1: also tests, lint, type checks.
VLARL_DEV=${VLARL_DEV:-1}
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

if ! dpkg -s libosmesa6 >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# torch first and alone, as the CPU build (2.13.0+cpu): plain PyPI's torch==2.13.0 on Linux is
# the CUDA build (several GB). The configured indexes are tried first (fast where a wheel
# mirror holds the CPU build), then PyTorch's CPU index. requirements.txt's torch==2.13.0 is
# then already satisfied, so nothing below resolves torch again.
if ! pip install -q "torch==2.13.0+cpu" 2>/dev/null; then
  pip install -q --index-url "$TORCH_CPU_INDEX" "torch==2.13.0+cpu"
fi
if [ "$VLARL_DEV" = 1 ]; then
  pip install -q -r requirements-dev.txt
else
  pip install -q -r requirements.txt
fi
# With its dependencies, so setup.py's install_requires is checked against what is installed.
pip install -q -e .
echo "vlarl is installed in .venv: run '.venv/bin/vlarl bringup' (see README.md)"
