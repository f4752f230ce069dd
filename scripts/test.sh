#!/usr/bin/env bash
# Set up, lint, and run the whole test suite (real files, a real local Ray cluster, the CLI).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "${SKIP_SETUP:-0}" = 1 ] || bash scripts/setup.sh
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=disabled HF_HUB_OFFLINE=1
unset RAY_ADDRESS
.venv/bin/ruff check .
.venv/bin/python -m pytest -q "$@"
