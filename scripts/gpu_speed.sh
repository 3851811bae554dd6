#!/usr/bin/env bash
# One GPU call, under 10 minutes: the SFT throughput benchmark (benchmarks/sft_throughput.py) for the
# Llama-3.2-1B and Qwen3-0.6B shapes, one model per GPU (two GPUs: in parallel), ftcore's best and
# no-tuning-keys configurations against TRL as shipped and tuned for speed, then one summary.
#
#   bash scripts/gpu_speed.sh RESULTS_DIR          # e.g. "$OUT" in a device call on nvidia-h200-x2
#   BUDGET=300 CONFIGS=ftcore-default,trl-defaults bash scripts/gpu_speed.sh RESULTS_DIR
#
# Writes RESULTS_DIR/summary.md (the tables and ratios), results-MODEL.jsonl (one JSON line per
# configuration), profile-MODEL-ftcore-liger-compile.txt (torch.profiler's kernel table of two steps
# after the timed ones), bench-MODEL.log (the drivers' output), logs/ (every worker's log), env.txt.
# Configurations run most important first; none starts with less than 90 s of BUDGET (seconds,
# default 450) left, and one still running when BUDGET ends (or after 240 s) is stopped. Prepare here first (with
# network): bash scripts/fetch_gpu_wheels.sh (creates .whl/, carried to the GPU machine).
set -uo pipefail
out=${1:?usage: bash scripts/gpu_speed.sh RESULTS_DIR}
mkdir -p "$out/logs"
source scripts/gpu_setup.sh
ftcore env > "$out/env.txt" 2>&1
budget=${BUDGET:-450}
head=ftcore-liger-compile,trl-bf16-packed-liger-flex-nockpt,ftcore-liger-compile-adamw,ftcore-liger-compile-ckpt4,ftcore-default,trl-defaults,trl-packed-liger-flex
tail=trl-bf16-packed-liger-flex,trl-bf16-packed-liger-flex-nockpt-compile,trl-bf16-packed-nockpt
declare -A configs=(
  [llama-1b]=${CONFIGS:-$head,$tail,ftcore-compile}
  [qwen3-0.6b]=${CONFIGS:-$head,$tail}
)
models=(llama-1b qwen3-0.6b)
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
[ "$gpus" -ge 1 ] || { echo "no GPU"; exit 1; }
lanes=$(( gpus < ${#models[@]} ? gpus : ${#models[@]} ))
lane_budget=$(( budget * lanes / ${#models[@]} ))  # one GPU: the models one after the other
nvidia-smi --query-gpu=index,name,memory.total --format=csv > "$out/gpus.txt" 2>&1

run_model() {  # model, GPU index
  local work=/tmp/ftcore-speed-$1
  rm -rf "$work"
  CUDA_VISIBLE_DEVICES=$2 python3 benchmarks/sft_throughput.py --models "$1" --configs "${configs[$1]}" \
    --budget "$lane_budget" --config-timeout 240 --work "$work" --out "$out/results-$1.jsonl" \
    --profile ftcore-liger-compile > "$out/bench-$1.log" 2>&1
  cp "$work"/*.log "$out/logs/" 2>/dev/null
  rm -rf "$work"
}

for i in "${!models[@]}"; do
  run_model "${models[$i]}" $(( i % lanes )) &
  if [ $(( (i + 1) % lanes )) -eq 0 ]; then wait; fi
done
wait
python3 benchmarks/sft_throughput.py --report "$out"/results-*.jsonl | tee "$out/summary.md"
