#!/usr/bin/env bash
# The fine-tuning recipe against the plain one (configs/fashion_mnist_recipe.yaml: ImageNet MobileNetV2 on
# Fashion-MNIST with 10 labels per class; recipe = TrivialAugment + weight EMA + layer-wise lr decay), 3 seeds,
# each stage's best epoch picked on held-out training images, reported on the 10,000 test images, as mean ± std.
# One command; running it again resumes whatever is unfinished (mtl sweep --resume).
#
#   bash benchmarks/recipe_table.sh [OUT]      (default OUT: runs/bench_recipe)
#
# Three runs at a time (one per seed), one thread each. Writes OUT/table.md (test accuracy of the epoch picked on
# validation, and the time per step), the pictures in OUT/plots and OUT/commit.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_recipe}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

mkdir -p "$OUT"
git describe --always --dirty >>"$OUT/commit.txt" 2>/dev/null || true
if [ -f "$OUT/sweep/sweep.json" ]; then
  mtl sweep --resume "$OUT/sweep"
else
  mtl sweep configs/fashion_mnist_recipe.yaml --seeds 0,1,2 --jobs 3 --dir "$OUT/sweep"
fi
mtl compare "$OUT/sweep" --time --plots "$OUT/plots" >"$OUT/table.md"
echo "table: $OUT/table.md"
