#!/usr/bin/env bash
# Set up everything, then run the whole test suite (the command CI runs through .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m pytest -q "$@"
