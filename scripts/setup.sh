#!/usr/bin/env bash
# Create .venv and install dleaf with pinned dependencies. torch goes first, alone and pinned, so that nothing
# pulls a CUDA build; the constraints file fixes every other version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0"
.venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]"
