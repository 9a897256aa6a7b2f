#!/usr/bin/env bash
# Few-shot budgets in steps (issue 19): ImageNet MobileNetV2 on Fashion-MNIST with 5 labels per class (50 training
# images, 2 steps an epoch at batch 32), fixed feature extractor and full fine-tuning, each with 30 epochs (60 steps,
# the old epoch budget) and with train.steps 300; 3 seeds, each stage's best validated epoch picked on 1,200
# held-out training images, reported on the 10,000 test images. One command; running it again resumes.
#
#   bash benchmarks/few_shot_steps.sh [OUT]      (default OUT: runs/bench_few_shot_steps)
#
# Three runs at a time (one per seed), one thread each. Writes OUT/table.md and OUT/commit.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_few_shot_steps}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

fixed='model: {freeze: all}'
full='model: {freeze: none}, optim: {lr: 0.0003}'
stages="stages=[{name: fixed_60_steps, $fixed, train: {epochs: 30, val_every: 5}},
  {name: full_60_steps, $full, train: {epochs: 30, val_every: 5}},
  {name: fixed_300_steps, $fixed, train: {steps: 300, val_every: 15}},
  {name: full_300_steps, $full, train: {steps: 300, val_every: 15}}]"
mkdir -p "$OUT"
git describe --always --dirty >>"$OUT/commit.txt" 2>/dev/null || true
if [ -f "$OUT/sweep/sweep.json" ]; then
  mtl sweep --resume "$OUT/sweep"
else
  mtl sweep configs/fashion_mnist_transfer.yaml --seeds 0,1,2 --jobs 3 data.labels_per_class=5 data.val_split=0.02 \
    data.val_batch_size=100 "$stages" --dir "$OUT/sweep"
fi
mtl compare "$OUT/sweep" --time >"$OUT/table.md"
echo "table: $OUT/table.md"
