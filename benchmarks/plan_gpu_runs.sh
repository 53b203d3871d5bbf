#!/usr/bin/env bash
# The planner's GPU calibration runs: single-GPU distlab runs of gpt2 (and small) at
# several micro-batches, precisions and checkpointing settings, whose config.yaml and
# summary.json land in OUT_DIR/<name>/ for
#
#   python -m distlab.plan --calibrate OUT_DIR/* --gpu h100-sxm --calibration h100.json
#
# usage: benchmarks/plan_gpu_runs.sh OUT_DIR [NAME_REGEX]   (on a machine with one CUDA GPU)
# OUT_DIR.tgz gets the same files in one archive.
set -euo pipefail
out=${1:?usage: benchmarks/plan_gpu_runs.sh OUT_DIR [NAME_REGEX]}
only=${2:-.}
work=$(mktemp -d)
run() {
  local name=$1; shift
  [[ $name =~ $only ]] || return 0
  echo "== $name"
  python3 -m distlab.launch --launcher local --no-wandb --quiet --config configs/gpt2-gpu.yaml \
    --nproc 1 --steps 12 --checkpoint-every 0 --no-final-checkpoint --run-dir "$work/$name" "$@" > "$work/$name.log" 2>&1 \
    || { echo "   failed: $(tail -1 "$work/$name.log")"; return 0; }
  mkdir -p "$out/$name"
  cp "$work/$name/config.yaml" "$work/$name/summary.json" "$out/$name/"
  python3 -c "import json,sys; s=json.load(open('$out/$name/summary.json')); print('   %.0f tokens/s, median step %.4f s' % (s['tokens_per_s'], s['median_step_time_s']))"
}
run single-mb8 --strategy single --micro-batch 8
run single-mb16 --strategy single --micro-batch 16
run single-mb32 --strategy single --micro-batch 32
run single-mb64 --strategy single --micro-batch 64
run single-mb32-ac-full --strategy single --micro-batch 32 --ac full
run single-mb32-ac-selective --strategy single --micro-batch 32 --ac selective
run single-mb8-fp32 --strategy single --micro-batch 8 --precision fp32
run fsdp-mb8 --strategy fsdp --micro-batch 8
run fsdp-mb32 --strategy fsdp --micro-batch 32
run small-mb64 --strategy single --model small --global-batch 256 --micro-batch 64
rm -rf "$work"
tar czf "$out.tgz" -C "$(dirname "$out")" "$(basename "$out")"
