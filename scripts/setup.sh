#!/usr/bin/env bash
# Create ./.venv and install star_dist into it (editable), with the test tools.
# Safe to rerun. torch is installed first and pinned: an unpinned torch can resolve to a
# multi-GB CUDA build. Set TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch>=2.4").
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[test]"
