"""Loading speed of multitask data sets: the per-item DataLoader path against whole batches gathered by the
data set (``data.pipeline: items`` vs ``batched``), on the training split of each config (default: scenes and
Multi-Fashion, which needs Fashion-MNIST). Data only, no model; the pipelines alternate for ``--rounds``.

    python benchmarks/dense_loading.py [--device cuda] [--rounds 2] [--config configs/mtl_scenes.yaml ...]
"""

from __future__ import annotations

import argparse
import time

import torch

from mtl.build.data import build_data
from mtl.config.load import build_config, load_config
from mtl.core.errors import UserError


def epoch_seconds(config: str, pipeline: str, device: torch.device) -> tuple[float, int]:
    cfg = build_config(*load_config(config, [f"data.pipeline={pipeline}"]))
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
    parser.add_argument("--config", action="append", help="a multitask config (repeatable)")
    args = parser.parse_args()
    device = torch.device(args.device)
    for config in args.config or ["configs/mtl_scenes.yaml", "configs/multi_fashion.yaml"]:
        print(config)
        best = {}
        try:
            for _ in range(args.rounds):
                for pipeline in ("items", "batched"):
                    seconds, n = epoch_seconds(config, pipeline, device)
                    best[pipeline] = min(best.get(pipeline, float("inf")), seconds)
                    print(f"  {pipeline:8s} {n:,} items in {seconds:.3f} s ({n / seconds:,.0f} items/s)")
        except UserError as e:
            print(f"  skipped: {e}")
            continue
        print(f"  batched / items speed: {best['items'] / best['batched']:.2f}x (best of {args.rounds})")


if __name__ == "__main__":
    main()
