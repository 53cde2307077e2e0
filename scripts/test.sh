#!/usr/bin/env bash
# Set up everything, then run the static checks and the whole test suite (the command CI runs through .ci/run):
# ruff and mypy (config: pyproject.toml), then every test, the real-model ones marked slow included, on two
# processes (pytest-xdist; each file runs whole on one process, the real-model tests together on one, see
# tests/conftest.py). DEPTHLENS_TEST_WORKERS=N changes the number of processes (0: one process, no xdist).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
PY=${PYTHON:-python3}
echo "[test] ruff check (config: pyproject.toml [tool.ruff])"
$PY -m ruff check .
echo "[test] mypy over the core (config: pyproject.toml [tool.mypy])"
$PY -m mypy
exec $PY -m pytest -q -n "${DEPTHLENS_TEST_WORKERS:-2}" --dist loadgroup "$@"
