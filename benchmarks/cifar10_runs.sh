#!/bin/sh
# The runs behind benchmarks/results/cifar10_table.md: every method at 1/3 FLOPs on CIFAR
# ResNet-20 from one converged baseline, equal search and fine-tuning budgets, several seeds,
# decisions on a validation folder and the reported top-1 on a test folder no decision saw.
#
#   sh benchmarks/cifar10_runs.sh RUNS_DIR BASELINE_WEIGHTS TRAIN VAL TEST "SEEDS" "METHODS"
#
# e.g. with the folders of benchmarks/cut_cifar10.py and the converged baseline of
# benchmarks/train_baseline.py (benchmarks/weights/resnet20_cifar10_116ep.pt):
#   sh benchmarks/cifar10_runs.sh /work/runs/t benchmarks/weights/resnet20_cifar10_116ep.pt \
#       /work/runs/cifar/train40k /work/runs/cifar/val5k /work/runs/cifar/test5k \
#       "0 1 2" "uniform magnitude gensynth autoshrink"
#
# Settings by environment: JOBS runs at once (default 2, each on one thread), SEARCH_EPOCHS,
# FINETUNE_EPOCHS, MAX_TRAIN (empty: the whole training folder), ROUND_TO (default auto),
# DISTILL (on/off), EXTRA (more optimize flags, e.g. "--set normalise=flops"), TAG (appended
# to each run's folder name, to keep variants apart). A finished run is skipped, an
# interrupted one resumed, so the script can be re-run.
set -eu
RUNS=$1; W=$2; TRAIN=$3; VAL=$4; TEST=$5; SEEDS=$6; METHODS=$7
JOBS=${JOBS:-2}
SEARCH_EPOCHS=${SEARCH_EPOCHS:-2}
FINETUNE_EPOCHS=${FINETUNE_EPOCHS:-10}
MAX_TRAIN=${MAX_TRAIN:-}
ROUND_TO=${ROUND_TO:-auto}
DISTILL=${DISTILL:-on}
EXTRA=${EXTRA:-}
TAG=${TAG:-}
BIN=${BIN:-.venv/bin}
LIMIT=""; [ -n "$MAX_TRAIN" ] && LIMIT="--max-train $MAX_TRAIN"
mkdir -p "$RUNS"
for seed in $SEEDS; do
  for m in $METHODS; do
    echo "$m $seed"
  done
done | xargs -P "$JOBS" -L 1 sh -c '
  m=$0; seed=$1; out="'"$RUNS"'/${m}'"$TAG"'_s${seed}"
  [ -f "$out/report.json" ] && exit 0
  resume=""; [ -d "$out/.state" ] && resume="--resume"
  OMP_NUM_THREADS=1 '"$BIN"'/graphsearch optimize examples/cifar_resnet20.py --method "$m" \
    --weights "'"$W"'" --data "'"$TRAIN"'" --val-data "'"$VAL"'" --test-data "'"$TEST"'" \
    --flops 0.33 --round-to '"$ROUND_TO"' --search-epochs '"$SEARCH_EPOCHS"' \
    --finetune-epochs '"$FINETUNE_EPOCHS"' '"$LIMIT"' --distill '"$DISTILL"' --seed "$seed" \
    --workers 1 '"$EXTRA"' --out "$out" $resume > "$out.log" 2>&1 \
    || echo "FAILED: $m seed $seed (see $out.log)"
'
