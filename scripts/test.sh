#!/usr/bin/env bash
# Set up everything, then run the whole test suite (the command CI runs through .ci/run):
# every test, the real-model ones marked slow included, on two processes (pytest-xdist; each
# file runs whole on one process, the real-model tests together on one, see tests/conftest.py).
# DEPTHLENS_TEST_WORKERS=N changes the number of processes (0: one process, no xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec ${PYTHON:-python3} -m pytest -q -n "${DEPTHLENS_TEST_WORKERS:-2}" --dist loadgroup "$@"
