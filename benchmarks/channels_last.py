"""`mtl train` full fine-tune of resnet18 with train.channels_last off and on, alternating, in one run (CPU or GPU).

Uses the ants/bees-shaped folder that benchmarks/speed.py makes (run it once first).

    python benchmarks/channels_last.py [--size 112] [--rounds 2]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mtl.config import build_config
from mtl.experiment import run


def images_per_second(root: Path, size: int, channels_last: str, out: Path) -> float:
    raw = {"name": "channels_last", "out_dir": str(out),
           "data": {"name": "folder", "root": str(root), "image_size": size, "resize_size": round(size * 256 / 224),
                    "batch_size": 32, "augment": "random_resized_crop"},
           "model": {"encoder": "resnet18"},
           "train": {"epochs": 3, "progress": False, "log_images": 0, "channels_last": channels_last}}
    summary = run(build_config(raw, {}), quiet=True)
    return summary["train_size"] / float(np.mean(summary["time"]["train_epoch_s"][1:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench_speed/data"))
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_channels_last"))
    args = parser.parse_args()
    if not (args.data / "train").is_dir():
        raise SystemExit(f"{args.data}/train not found: run python benchmarks/speed.py once, or pass --data")
    best = {"off": 0.0, "on": 0.0}
    for i in range(args.rounds):
        for mode in ("off", "on"):
            ips = images_per_second(args.data, args.size, mode, args.out)
            best[mode] = max(best[mode], ips)
            print(f"round {i + 1}  channels_last {mode:3s}  {ips:.1f} img/s", flush=True)
    print(f"on / off = {best['on'] / best['off']:.2f} (best of {args.rounds}, {args.size} px)")


if __name__ == "__main__":
    main()
