#!/usr/bin/env bash
# Split and Permuted Fashion-MNIST, 3 seeds: progressive networks against every continual-learning baseline, each
# task's best epoch picked on held-out training images, every accuracy reported on the test images; per method
# ACC, BWT, FWT (GEM), forgetting and the progressive-nets transfer as mean ± std over the seeds, parameters
# added, training time and memory per task, mean accuracy matrices as heatmaps and ACC against parameters. One
# command; running it again resumes whatever is unfinished (mtl sweep --resume).
#
#   bash benchmarks/continual_table.sh [OUT]      (default OUT: runs/bench_continual)
#
# Two runs at a time, one thread each. Writes OUT/split.md and OUT/permuted.md (the tables), the pictures in
# OUT/split_plots and OUT/permuted_plots, and OUT/commit.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_continual}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1

sweep() {  # sweep DIR CONFIG [overrides...]: start it, or resume it when it exists
  local dir=$1 config=$2
  shift 2
  if [ -f "$dir/sweep.json" ]; then
    mtl sweep --resume "$dir"
  else
    mtl sweep "$config" --seeds 0,1,2 --jobs 2 "$@" --dir "$dir"
  fi
}

mkdir -p "$OUT"
git describe --always --dirty >>"$OUT/commit.txt" 2>/dev/null || true
sweep "$OUT/split" configs/continual_split_fmnist.yaml
sweep "$OUT/permuted" configs/continual_permuted_fmnist.yaml
for stream in split permuted; do
  mtl compare "$OUT/$stream" --plots "$OUT/${stream}_plots" >"$OUT/$stream.md"
done
echo "tables: $OUT/split.md $OUT/permuted.md"
