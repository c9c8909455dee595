#!/bin/bash
# Train the benchmarks' CIFAR baselines on a GPU machine (the workplace's `device` tool) inside
# a fixed time budget, from the JPEG zip the CPU folders are cut from:
#
#   mkdir -p .gpudata && cp ../shared/data/cifar10/train.zip .gpudata/   # .gpudata is ignored
#   device run (carry .gpudata):  OUT=$OUT bash benchmarks/device_baselines.sh .gpudata/train.zip 540
#
# Cuts the same three folders as on the CPU machine (`cut_cifar10.py`, seed 0), times two
# epochs of ResNet-20 and ResNet-32 trained side by side, then gives each the largest number of
# epochs (at most MAX_EPOCHS, default 200) that fits what is left of the budget, and trains both
# at once with `train_baseline.py` (one-cycle SGD, crop, flip and --cutout CUTOUT, default 16).
# Writes the weights, their checkpoints if a run was cut short, and the logs under $OUT.
set -u
ZIP=$1
BUDGET=$2
MAX_EPOCHS=${MAX_EPOCHS:-200}
CUTOUT=${CUTOUT:-16}
START=$SECONDS
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
if ! python3 -c "import graphsearch.passes" 2>/dev/null; then
  ln -sfn ../passes graphsearch/passes   # the installed layout, without an install
  export PYTHONPATH=$PWD
fi
LOG=$OUT/device_log.txt
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  nproc; } >"$LOG" 2>&1
if [ -z "${DATA:-}" ]; then  # DATA: other folders (a dry run on a few images)
  python3 benchmarks/cut_cifar10.py "$ZIP" /tmp/cifar >>"$LOG" 2>&1 || { echo "cut failed" >>"$LOG"; exit 1; }
  DATA="--train /tmp/cifar/train40k --val /tmp/cifar/val5k --test /tmp/cifar/test5k"
fi
mkdir -p /tmp/cal /tmp/gpu
for m in resnet20 resnet32; do
  python3 benchmarks/train_baseline.py --model $m --epochs 2 --cutout "$CUTOUT" $DATA \
    --out /tmp/cal/$m.pt >/tmp/cal/$m.log 2>/tmp/cal/$m.err &
done
wait
for m in resnet20 resnet32; do
  cat /tmp/cal/$m.log; tail -c 2000 /tmp/cal/$m.err | tr '\r' '\n' | tail -3
done >>"$LOG"
per_epoch() { grep '^epoch   2' "/tmp/cal/$1.log" | awk '{print $NF}' | tr -d s; }
S20=$(per_epoch resnet20)
S32=$(per_epoch resnet32)
LEFT=$((BUDGET - (SECONDS - START) - 45))  # 45 s: data loading, final evaluations, copying
echo "calibration: resnet20 ${S20}s/epoch, resnet32 ${S32}s/epoch side by side; ${LEFT}s left" >>"$LOG"
[ -n "$S20" ] && [ -n "$S32" ] || { echo "calibration failed" >>"$LOG"; exit 1; }
epochs() { python3 -c "print(max(1, min($MAX_EPOCHS, int($LEFT * 0.9 / $1))))"; }
E20=$(epochs "$S20")
E32=$(epochs "$S32")
echo "epochs: resnet20 $E20, resnet32 $E32" >>"$LOG"
for pair in "resnet20 $E20" "resnet32 $E32"; do
  set -- $pair
  timeout $((LEFT + 30)) python3 benchmarks/train_baseline.py --model $1 --epochs $2 \
    --cutout "$CUTOUT" $DATA --out /tmp/gpu/${1}_cifar10_${2}ep_cutout.pt >/tmp/gpu/$1.log \
    2>/tmp/gpu/$1.err &
done
wait
for m in resnet20 resnet32; do
  { cat /tmp/gpu/$m.log; tail -c 3000 /tmp/gpu/$m.err | tr '\r' '\n' | tail -5; } >"$OUT/$m.log"
  ls /tmp/gpu/${m}_*.pt >/dev/null 2>&1 && cp /tmp/gpu/${m}_*.pt "$OUT"/ \
    || cp /tmp/gpu/${m}_*.ckpt "$OUT"/ 2>/dev/null  # cut short: its checkpoint
done
echo "done after $((SECONDS - START)) s" >>"$LOG"
