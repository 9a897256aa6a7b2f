"""`mtl train` full fine-tune of resnet18 with train.channels_last off and on, alternating, in one run (CPU or GPU);
and, with --accuracy, how far float32 results in each memory format land from a float64 reference.

Uses the ants/bees-shaped folder that benchmarks/speed.py makes (run it once first).

    python benchmarks/channels_last.py [--size 112] [--rounds 2]
    python benchmarks/channels_last.py --accuracy
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mtl.config.load import build_config
from mtl.workflows.train import run


def images_per_second(root: Path, size: int, channels_last: str, out: Path) -> float:
    raw = {
        "name": "channels_last",
        "out_dir": str(out),
        "data": {
            "name": "folder",
            "root": str(root),
            "image_size": size,
            "resize_size": round(size * 256 / 224),
            "batch_size": 32,
            "augment": "random_resized_crop",
        },
        "model": {"encoder": "resnet18"},
        "train": {"epochs": 3, "progress": False, "log_images": 0, "channels_last": channels_last},
    }
    summary = run(build_config(raw, {}), quiet=True)
    return summary["train_size"] / float(np.mean(summary["time"]["train_epoch_s"][1:]))


def _relative_error(module: nn.Module, x: torch.Tensor, channels_last: bool) -> tuple:
    """Largest |float32 - float64| / max|float64| of the output and of the input gradient."""
    ref = module.double()
    x64 = x.detach().clone().double().requires_grad_()
    out64 = ref(x64)
    upstream = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out64.backward(upstream)
    m32 = module.float()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    m32 = m32.to(memory_format=fmt)
    x32 = x.detach().clone().float().contiguous(memory_format=fmt).requires_grad_()
    out32 = m32(x32)
    out32.backward(upstream.float())
    err = lambda a, b: float((a.detach().double() - b).abs().max() / b.abs().max())  # noqa: E731
    return err(out32, out64.detach()), err(x32.grad, x64.grad)


def accuracy() -> None:
    import torchvision

    torch.manual_seed(0)
    cases = {
        "conv 3x3 (64 -> 64)": (nn.Conv2d(64, 64, 3, padding=1), (8, 64, 28, 28)),
        "BatchNorm (64)": (nn.BatchNorm2d(64), (8, 64, 28, 28)),
        "GroupNorm (8 groups, 64)": (nn.GroupNorm(8, 64), (8, 64, 28, 28)),
        "GroupNorm, batch 4": (nn.GroupNorm(8, 64), (4, 64, 28, 28)),
        "resnet18 (train mode)": (torchvision.models.resnet18(num_classes=10), (8, 3, 64, 64)),
    }
    print(f"threads {torch.get_num_threads()}  |  largest error relative to the float64 result's largest value\n")
    print("| layer | output NCHW | output NHWC | input grad NCHW | input grad NHWC |\n|---|---:|---:|---:|---:|")
    for name, (module, shape) in cases.items():
        x = torch.randn(shape)
        (o1, g1), (o2, g2) = (_relative_error(module, x, cl) for cl in (False, True))
        print(f"| {name} | {o1:.1e} | {o2:.1e} | {g1:.1e} | {g2:.1e} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("runs/bench_speed/data"))
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/bench_channels_last"))
    parser.add_argument("--accuracy", action="store_true", help="only the float32-vs-float64 table")
    args = parser.parse_args()
    if args.accuracy:
        accuracy()
        return
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
