"""Training throughput: the reference tutorial's loop vs `mtl train` vs the compute limit, in one run.

    python benchmarks/speed.py                 # CPU: small (64 px, 3 short epochs), about a minute
    python benchmarks/speed.py --size 224      # GPU: full size

On a JPEG folder shaped like the tutorial's ants/bees set (made here: 2 classes, 400 photos-like JPEGs of
500x375, or --data DIR), prints images/s and peak GPU memory for
  (a) the tutorial's loop written out plainly: ImageFolder + PIL transforms, batch 4, fp32;
  (b) `mtl train`, full fine-tune (epochs after the first);
  (c) `mtl train`, frozen encoder (features cached once; epochs after the first);
  (d) the compute limit: random tensors already on the device, same model and batch, bf16 on GPUs, channels_last;
and the ratios b/a, b/d, c/d. Then one training step per weighting method on the built-in multitask
scenes, relative to equal weighting (gradient methods with grad_on=representation and params).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from typing import Any, Dict, List, Tuple

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

from mtl.build.experiment import build_experiment
from mtl.config.load import build_config
from mtl.core.runtime import use_amp
from mtl.workflows.train import run

GRADIENT_METHODS = ("mgda", "pcgrad", "cagrad", "nash_mtl")


def make_folder(root: Path, n: int = 400, seed: int = 0) -> Path:
    """``root/{train,val}/{ants,bees}/*.jpg``: 500x375 JPEGs of smooth random colour fields (60% train)."""
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(seed)
    for i in range(n):
        split = "train" if i < int(0.6 * n) else "val"
        cls = ("ants", "bees")[i % 2]
        low = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(low).resize((500, 375), Image.BICUBIC)
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.jpg", quality=90)
    (root / "done").write_text("ok\n")
    return root


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB" if device.type == "cuda" else "-"


def tutorial_loop(root: Path, size: int, device: torch.device, epochs: int, workers: int) -> float:
    """Images/s of the tutorial's training loop (epochs after the first), written as the tutorial writes it."""
    from torchvision import datasets, transforms

    tf = transforms.Compose(
        [
            transforms.RandomResizedCrop(size),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    data = datasets.ImageFolder(str(root / "train"), tf)
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, num_workers=workers, persistent_workers=workers > 0
    )
    model = torchvision.models.resnet18(num_classes=2).to(device)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model.train()
    rates = []
    for epoch in range(epochs):
        _sync(device)
        start, n = time.perf_counter(), 0
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            n += inputs.size(0)
        _sync(device)
        rates.append(n / (time.perf_counter() - start))
    return float(np.mean(rates[1:] if len(rates) > 1 else rates))


def mtl_run(
    root: Path, size: int, epochs: int, batch: int, out: Path, data: Dict[str, Any] | None = None, **model: Any
) -> Tuple[float, float, Dict]:
    """(images/s after the first epoch, images/s of the first, summary) of `mtl train` on the folder."""
    raw = {
        "name": "speed",
        "out_dir": str(out),
        "data": {
            "name": "folder",
            "root": str(root),
            "image_size": size,
            "resize_size": round(size * 256 / 224),
            "batch_size": batch,
            "augment": model.pop("augment", "random_resized_crop"),
            **(data or {}),
        },
        "model": {"encoder": "resnet18", **model},
        "train": {"epochs": epochs, "progress": False, "log_images": 0},
    }
    summary = run(build_config(raw, {}), quiet=True)
    times = summary["time"]["train_epoch_s"]
    n = summary["train_size"]
    later = times[1:] if len(times) > 1 else times
    first = times[0] + summary.get("feature_cache_s", 0.0)  # caching happens before the first epoch
    return n / float(np.mean(later)), n / first, summary


def compute_limit(size: int, batch: int, device: torch.device, steps: int, frozen: bool = False) -> float:
    """Images/s of resnet18 forward+backward+step on random tensors already on the device."""
    model = torchvision.models.resnet18(num_classes=2).to(device)
    if frozen:
        for name, p in model.named_parameters():
            p.requires_grad_(name.startswith("fc."))
    amp = use_amp("auto", device)
    model = model.to(memory_format=torch.channels_last)  # as mtl's default (train.channels_last: auto)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 2, (batch,), device=device)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.001, momentum=0.9)
    for i in range(steps + 3):
        if i == 3:
            _sync(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    _sync(device)
    return steps * batch / (time.perf_counter() - start)


def weighting_steps(methods: List[str], size: int, steps: int, device: torch.device) -> List[Tuple[str, float, str]]:
    """(method [grad_on], median seconds per training step, peak memory) on the scenes config, same batch.

    The methods take turns step by step (round robin), so drifts of the machine's speed hit all alike.
    """
    from mtl.config.load import load_config
    from mtl.engine.optim import build_optimizer
    from mtl.engine.trainer import Trainer, _Meter

    raw, sources = load_config(Path(__file__).parents[1] / "configs" / "mtl_scenes.yaml")
    raw = copy.deepcopy(raw)
    raw.setdefault("data", {})["options"] = {"size": size, "train_size": 64, "val_size": 8, "seed": 0}
    raw["data"]["num_workers"] = 0
    raw.setdefault("train", {}).update(progress=False, log_images=0)
    raw.setdefault("tasks", {})["label"] = None  # 3 tasks: seg, depth, normal (as NYUv2)
    runs = []
    for method in methods:
        for grad_on in ("representation", "params") if method in GRADIENT_METHODS else (None,):
            r = copy.deepcopy(raw)
            r.setdefault("weighting", {})["name"] = method
            if grad_on:
                r["weighting"]["grad_on"] = grad_on
            exp = build_experiment(build_config(r, sources))
            trainer = Trainer(
                exp.model,
                exp.tasks,
                exp.loaders,
                build_optimizer(exp.model, exp.cfg.optim),
                None,
                epochs=1,
                device=exp.device,
                amp=use_amp("auto", exp.device),
                weighting=exp.weighting,
                grad_on=exp.cfg.weighting.grad_on,
                progress=False,
            )
            exp.model.train()
            name = method + (f" [{grad_on}]" if grad_on else "")
            runs.append((name, trainer, next(iter(exp.loaders["train"])), _Meter(exp.tasks, exp.device), exp.device))
    times: Dict[str, List[float]] = {name: [] for name, *_ in runs}
    peaks: Dict[str, str] = {}
    for i in range(steps + 2):
        for name, trainer, batch, meter, dev in runs:
            if i == 2:
                _reset_peak(dev)
            _sync(dev)
            start = time.perf_counter()
            trainer.step(batch, meter, True)
            _sync(dev)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - start)
    for name, trainer, batch, meter, dev in runs:  # peak memory one method at a time
        _reset_peak(dev)
        trainer.step(batch, meter, True)
        _sync(dev)
        peaks[name] = _peak(dev)
    return [(name, float(np.median(times[name])), peaks[name]) for name, *_ in runs]


def main(argv: List[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=None, help="an image folder root/{train,val}/<class>/ (default: made)"
    )
    parser.add_argument("--size", type=int, default=None, help="training resolution (default 224 on GPU, 64 on CPU)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 4 on GPU, 3 on CPU)")
    parser.add_argument("--batch", type=int, default=None, help="mtl batch size (default 128 on GPU, 32 on CPU)")
    parser.add_argument("--workers", type=int, default=4, help="tutorial loader workers (the tutorial uses 4)")
    parser.add_argument("--methods", default="equal,uncertainty,famo,mgda,pcgrad,cagrad,nash_mtl")
    parser.add_argument("--parts", default="throughput,weighting", help="which tables: throughput, weighting or both")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_speed"))
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    size = args.size or (224 if gpu else 64)
    epochs = args.epochs or (4 if gpu else 3)
    batch = args.batch or (128 if gpu else 32)
    root = args.data or make_folder(args.out / "data")
    name = torch.cuda.get_device_name() if gpu else f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    print(f"# {date.today()}  |  {name}  |  torch {torch.__version__}  |  python {platform.python_version()}")
    print(f"# python {' '.join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])])}")
    print(f"# data {root}  |  {size}x{size}  |  {epochs} epochs per run, images/s averaged over epochs 2..{epochs}\n")

    parts = set(args.parts.split(","))
    if "throughput" in parts:
        throughput(root, size, epochs, batch, device, args)
    methods = [m for m in args.methods.split(",") if m]
    if "weighting" in parts and methods:
        steps = weighting_steps(methods, 64 if not gpu else 128, steps=9 if not gpu else 30, device=device)
        base = next(s for m, s, _ in steps if m == "equal") if any(m == "equal" for m, _, _ in steps) else steps[0][1]
        print("\n| weighting (scenes: seg, depth, normal) | s/step | × equal | peak GPU memory |\n|---|---:|---:|---:|")
        for method, seconds, peak in steps:
            print(f"| {method} | {seconds * 1000:.1f} ms | {seconds / base:.2f} | {peak} |")
    return 0


def throughput(root: Path, size: int, epochs: int, batch: int, device: torch.device, args: argparse.Namespace) -> None:
    gpu = device.type == "cuda"
    rows = []
    _reset_peak(device)
    a = tutorial_loop(root, size, device, epochs, args.workers)
    rows.append(("(a) tutorial loop (ImageFolder + PIL, batch 4, fp32)", a, "", _peak(device)))
    _reset_peak(device)
    b, b1, _ = mtl_run(root, size, epochs, batch, args.out, weights=None)
    rows.append((f"(b) mtl train, full fine-tune (batch {batch})", b, f"first epoch {b1:,.0f}/s", _peak(device)))
    _reset_peak(device)
    bi, bi1, _ = mtl_run(
        root, size, epochs, batch, args.out, data={"pipeline": "items", "num_workers": args.workers}, weights=None
    )
    rows.append(
        (
            f"(b') the same with data.pipeline=items (per-item PIL transforms, {args.workers} workers)",
            bi,
            f"first epoch {bi1:,.0f}/s",
            _peak(device),
        )
    )
    _reset_peak(device)
    c, c1, summary = mtl_run(root, size, epochs, batch, args.out, weights=None, freeze="all", augment="none")
    how = "features cached" if "feature_cache_s" in summary else "features NOT cached"
    rows.append(
        (
            f"(c) mtl train, frozen encoder, {how} (batch {batch})",
            c,
            f"first epoch incl. caching {c1:,.0f}/s",
            _peak(device),
        )
    )
    _reset_peak(device)
    d = compute_limit(size, batch, device, steps=20 if gpu else 5)
    rows.append(
        (f"(d) compute limit, full fine-tune (random tensors on {device.type}, batch {batch})", d, "", _peak(device))
    )
    print("| run | images/s | note | peak GPU memory |\n|---|---:|---|---:|")
    for label, rate, note, peak in rows:
        print(f"| {label} | {rate:,.0f} | {note} | {peak} |")
    print(
        f"\nb/a = {b / a:.2f}    b/b' = {b / bi:.2f}    b/d = {b / d:.2f}    c/d = {c / d:.2f}    "
        f"c later epochs / c first epoch = {c / c1:.1f}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
