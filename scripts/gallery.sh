#!/usr/bin/env bash
# Rebuild the README gallery from results files alone: every figure of the default organism's
# newest runs, as PNG, into docs/gallery/ (HTML + plotted-data JSON stay in figures/out/).
#   bash scripts/gallery.sh [RESULTS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-results}
python -m figures --results "$RESULTS" --out figures/out --formats png --html-js directory
mkdir -p docs/gallery
for tag in smollm2-135m-instruct-sft smollm2-135m-instruct; do
  [ -d "figures/out/$tag" ] || continue
  mkdir -p "docs/gallery/$tag"
  cp figures/out/$tag/*.png "docs/gallery/$tag/" 2>/dev/null || true
done
cp figures/out/*.png docs/gallery/ 2>/dev/null || true
ls -R docs/gallery
