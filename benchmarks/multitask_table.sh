#!/usr/bin/env bash
# Multi-Fashion, 3 seeds: every architecture (model.arch) with equal weighting and every weighting method with hard
# sharing, against single-task baselines: per-task accuracy, Δm, train ms/step and training memory, each as
# mean ± std over the seeds. One command; running it again resumes whatever is unfinished (mtl sweep --resume).
#
#   bash benchmarks/multitask_table.sh [OUT]      (default OUT: runs/bench_multitask)
#
# Reduced to run on a 2-core CPU: 5,000 training pairs (10 % of them held out for validation, which picks the best
# epoch), 3 epochs, 10,000 test pairs scored once with the best-on-validation checkpoint; two runs at a time, one
# thread each. Writes OUT/archs.md and OUT/methods.md (tables on the test pairs) and OUT/commit.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_multitask}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
OPTS='data.options={train_size: 5000, val_size: 1000, test_size: 10000, val_fraction: 0.1, seed: 0}'
ARCHS=hard,mtan,cross_stitch,mmoe,cgc,ple,dselect_k,ltb
# every weighting method but two with sweeps of their own below: STCH, whose default 5 warm-up epochs would leave
# no epoch of its own in 3 (1 here), and GradDrop, which is defined on the shared representation only
METHODS=equal,static,uncertainty,dwa,gradnorm,rlw,geometric_mean,famo,scale_invariant,auto_lambda
METHODS+=,mgda,pcgrad,gradvac,cagrad,imtl_g,imtl,nash_mtl,aligned_mtl,upgrad,dualproj,config,fairgrad,db_mtl,moco
METHODS+=,excess_mtl,modo,sdmgrad

sweep() {  # sweep DIR [grid arguments...]: start it, or resume it when it exists
  local dir=$1
  shift
  if [ -f "$dir/sweep.json" ]; then
    mtl sweep --resume "$dir"
  else
    mtl sweep configs/multi_fashion.yaml --seeds 0,1,2 "$OPTS" train.epochs=3 --jobs 2 "$@" --dir "$dir"
  fi
}

mkdir -p "$OUT"
git describe --always --dirty >>"$OUT/commit.txt" 2>/dev/null || true
sweep "$OUT/base_left" tasks.right=null
sweep "$OUT/base_right" tasks.left=null
sweep "$OUT/archs" model.arch=$ARCHS
sweep "$OUT/methods" weighting.name=$METHODS
sweep "$OUT/stch" weighting.name=stch "weighting.options={warmup_epochs: 1}"
sweep "$OUT/graddrop" weighting.name=graddrop weighting.grad_on=representation
mtl compare "$OUT/base_left" "$OUT/base_right" --write-baseline "$OUT/baseline.yaml"
mtl compare "$OUT/archs" --baseline "$OUT/baseline.yaml" --metrics acc --time >"$OUT/archs.md"
mtl compare "$OUT/methods" "$OUT/stch" "$OUT/graddrop" --baseline "$OUT/baseline.yaml" --metrics acc --time \
  >"$OUT/methods.md"
echo "tables: $OUT/archs.md $OUT/methods.md"
