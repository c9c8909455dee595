#!/bin/sh
# The runs behind benchmarks/results/cifar10_table.md: every method at 1/3 FLOPs on CIFAR
# ResNet-20 from one baseline, equal search and fine-tuning budgets, several seeds, decisions
# on a validation folder and the reported top-1 on a test folder no decision saw.
#
#   sh benchmarks/cifar10_runs.sh RUNS_DIR BASELINE_WEIGHTS TRAIN VAL TEST "SEEDS" "METHODS"
#
# TRAIN/VAL/TEST: ImageFolder folders (disjoint; cifar10_table.md says how they were cut from
# ../shared/data/cifar10/train.zip). JOBS runs go at once (default 2), each on one thread.
# A finished run is skipped, an interrupted one resumed, so the script can be re-run.
set -eu
RUNS=$1; W=$2; TRAIN=$3; VAL=$4; TEST=$5; SEEDS=$6; METHODS=$7
JOBS=${JOBS:-2}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-2}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-2}
MAX_TRAIN=${MAX_TRAIN:-8000}
BIN=${BIN:-.venv/bin}
mkdir -p "$RUNS"
for seed in $SEEDS; do
  for m in $METHODS; do
    echo "$m $seed"
  done
done | xargs -P "$JOBS" -L 1 sh -c '
  m=$0; seed=$1; out="'"$RUNS"'/${m}_s${seed}"
  [ -f "$out/report.json" ] && exit 0
  resume=""; [ -d "$out/.state" ] && resume="--resume"
  OMP_NUM_THREADS=1 '"$BIN"'/graphsearch optimize examples/cifar_resnet20.py --method "$m" \
    --weights "'"$W"'" --data "'"$TRAIN"'" --val-data "'"$VAL"'" --test-data "'"$TEST"'" \
    --flops 0.33 --round-to 1 --search-epochs '"$SEARCH_EPOCHS"' \
    --finetune-epochs '"$FINETUNE_EPOCHS"' --max-train '"$MAX_TRAIN"' --seed "$seed" \
    --workers 1 --out "$out" $resume > "$out.log" 2>&1 || echo "FAILED: $m seed $seed (see $out.log)"
'
