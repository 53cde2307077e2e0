#!/usr/bin/env bash
# One command that exercises the toolkit on a GPU and prints what it costs (≤ 8 min on one H100):
#   1. the layer_sensitivity main job (python -m analyses.layer_sensitivity: the organism, built on first use),
#   2. the organism recipe :sft built with --max-steps 20 (the accelerate training loop),
#   3. one LoRA (r = 16) step and one MeZO step,
#   4. greedy generation throughput,
#   5. at real scale, on a random-weight model with Llama-3.1-8B's shapes in bf16: a forward with residual
#      capture at every layer, generation at batch 16, one layer_sensitivity kind on one layer, one LoRA step,
#      one QLoRA step, one MeZO step and one FSDP2 step on one rank (tokens/s each),
# each with its wall time and peak memory (CUDA max_memory_allocated), then a summary table.
# On CUDA the models run in bf16 (the toolkit's default there); on CPU step 5 runs on a small shape.
#
#   bash scripts/gpu_check.sh                            # CUDA, the embedded default model
#   bash scripts/gpu_check.sh --quick                    # CUDA, fewer prompts and tokens
#   DEPTHLENS_DEVICE=cpu bash scripts/gpu_check.sh --quick   # the same steps on tiny-llama on CPU (CI)
#
# DEPTHLENS_DEVICE: cuda (default) or cpu. GPU_CHECK_OUT: where results go (default: a temp dir).
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
for arg in "$@"; do
  case "$arg" in
    --quick) QUICK=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$arg' (the only option is --quick)." >&2; exit 2 ;;
  esac
done
DEVICE="${DEPTHLENS_DEVICE:-cuda}"
case "$DEVICE" in
  cuda|cpu) ;;
  *) echo "gpu_check.sh: DEPTHLENS_DEVICE must be cuda or cpu, got '$DEVICE'." >&2; exit 2 ;;
esac
if [ "$DEVICE" = cpu ] && [ "$QUICK" = 0 ]; then
  echo "gpu_check.sh: on CPU only --quick is meant to run (tiny-llama); add --quick." >&2; exit 2
fi
PY="${PYTHON:-python3}"
OUT="${GPU_CHECK_OUT:-$(mktemp -d -t gpu_check.XXXXXX)}"
mkdir -p "$OUT"
REPORT="$OUT/report.jsonl"
: > "$REPORT"

if [ "$DEVICE" = cpu ]; then          # CI: every step on the random 2-layer model
  BASE=tiny-llama
  LS_ARGS=(--model tiny-llama --quick)
  SFT_DATA=(--n-harmful 16 --n-benign 16)
  STEPS=(--batch-size 4 --gen-prompts 16 --gen-tokens 16 --gen-batch-size 8)
  SHAPE=tiny2
elif [ "$QUICK" = 1 ]; then
  BASE=smollm2-135m-instruct
  LS_ARGS=(--quick)
  SFT_DATA=(--n-harmful 64 --n-benign 64)
  STEPS=(--batch-size 8 --gen-prompts 64 --gen-tokens 32 --gen-batch-size 32)
  SHAPE=llama-3.1-8b
else
  BASE=smollm2-135m-instruct
  LS_ARGS=()
  SFT_DATA=()
  STEPS=(--batch-size 8 --gen-prompts 128 --gen-tokens 64 --gen-batch-size 64)
  SHAPE=llama-3.1-8b
fi

check() { "$PY" scripts/gpu_check.py --device "$DEVICE" --report "$REPORT" "$@"; }

echo "gpu_check: device $DEVICE, base model $BASE, results in $OUT"
check module layer_sensitivity analyses.layer_sensitivity "${LS_ARGS[@]}" --device "$DEVICE" --out "$OUT/layer_sensitivity"
check module "sft --max-steps 20" finetune.sft --model "$BASE" --max-steps 20 "${SFT_DATA[@]}" --device "$DEVICE"
check steps --model "$BASE" "${STEPS[@]}"
check scale --shape "$SHAPE"
check summary --expect layer_sensitivity "sft --max-steps 20" "lora r=16 step" "mezo step" generation \
  "scale forward+capture" "scale generation b16" "scale layer_sensitivity" "scale lora step" "scale qlora step" \
  "scale mezo step" "scale fsdp2 step"
