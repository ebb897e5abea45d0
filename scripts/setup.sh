#!/usr/bin/env bash
# One-time setup on Debian/Ubuntu with Python 3.11: OSMesa for CPU rendering, a virtual
# environment in .venv with pinned dependencies, and vlarl installed in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}

if ! dpkg -s libosmesa6 >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libosmesa6 >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first and alone, so nothing resolves an unpinned torch to the CUDA build.
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps -e .
echo "vlarl is installed in .venv: run '.venv/bin/vlarl bringup' (see README.md)"
