"""Loading speed of a multitask data set: the per-item DataLoader path against whole batches gathered by the
data set (``data.pipeline: items`` vs ``batched``), on the training split of configs/mtl_scenes.yaml. Data only,
no model; each pipeline twice, alternating.

    python benchmarks/dense_loading.py [--device cuda] [--rounds 2]
"""
from __future__ import annotations

import argparse
import time

import torch

from mtl.config import build_config, load_config
from mtl.experiment import build_data


def epoch_seconds(pipeline: str, device: torch.device) -> tuple[float, int]:
    cfg = build_config(*load_config("configs/mtl_scenes.yaml", [f"data.pipeline={pipeline}"]))
    _, _, loaders, _, _ = build_data(cfg, device)
    started, n = time.perf_counter(), 0
    for batch in loaders["train"]:
        n += len(batch["image"].to(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    device = torch.device(args.device)
    best = {}
    for _ in range(args.rounds):
        for pipeline in ("items", "batched"):
            seconds, n = epoch_seconds(pipeline, device)
            best[pipeline] = min(best.get(pipeline, float("inf")), seconds)
            print(f"{pipeline:8s} {n} scenes in {seconds:.3f} s ({n / seconds:,.0f} scenes/s)")
    print(f"batched / items speed: {best['items'] / best['batched']:.2f}x (best of {args.rounds})")


if __name__ == "__main__":
    main()
