"""``multi_fashion``: Multi-Fashion (Lin et al. 2019, after Sener & Koltun's MultiMNIST), two Fashion-MNIST items
overlaid in one 36x36 image, the ``left`` one shifted up-left and the ``right`` one down-right."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torchvision.datasets
from torch import Tensor
from torch.utils.data import Dataset

from mtl.core.errors import UserError
from mtl.data.cache import cache_path, load_or_build
from mtl.data.dense_batches import shift_batch, to_device
from mtl.data.dense_transforms import normalize, random_shift
from mtl.data.mnist import DEFAULT_ROOT, FASHION_MNIST_ROOT, _find, read_idx
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

CANVAS = 36
ITEM = 28
MAX_SHIFT = 4  # each item sits 1..4 pixels from the centre, per axis: never both centred, left/right stay distinct
DEFAULT_CACHE = "data/multi_fashion"
_FORMAT = 2  # bump when the construction changes, to invalidate caches (2: val from held-out training items)
_PREFIX = {"train": "train", "test": "t10k"}
_AUGMENT_SHIFT = 2  # pixels of random translation of the whole image when augmenting (no flips: left/right)


class MultiFashionDataset(Dataset):
    """Items ``{"image": (3,36,36) normalised, "left": class, "right": class}``."""

    def __init__(
        self,
        images: Tensor,
        left: Tensor,
        right: Tensor,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.images, self.left, self.right = images, left, right
        self.classes = list(torchvision.datasets.FashionMNIST.classes)
        target = {"type": "classification", "num_classes": len(self.classes), "classes": list(self.classes)}
        self.targets = {"left": dict(target), "right": dict(target)}
        self.augment = augment
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index].float().div(255).expand(3, -1, -1)
        if self.augment:
            image = random_shift(image, _AUGMENT_SHIFT)
        return {
            "image": normalize(image, self.mean, self.std),
            "left": self.left[index].clone(),
            "right": self.right[index].clone(),
        }

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random shifts of n items: window offsets in [0, 2 * shift] (see ``dense_batches``)."""
        return {k: torch.randint(2 * _AUGMENT_SHIFT + 1, (n,), generator=generator) for k in ("top", "left")}

    def gather(self, rows: Tensor, device: torch.device, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Items ``rows`` stacked on ``device`` (uint8 copies, converted there), shifted by ``params``."""
        image = to_device(self.images[rows], device).float().div(255).expand(-1, 3, -1, -1)
        if params is not None:
            image = shift_batch(image, params["top"], params["left"], _AUGMENT_SHIFT)
        return {
            "image": normalize(image, self.mean, self.std),
            "left": self.left[rows].to(device),
            "right": self.right[rows].to(device),
        }


@DATASETS.register("multi_fashion")
def multi_fashion(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    train_size: int = 60000,
    val_size: int = 10000,
    test_size: int = 10000,
    val_fraction: float = 0.1,
    seed: int = 0,
    cache_dir: str | None = None,
) -> MultiFashionDataset:
    """Pairs built from Fashion-MNIST IDX files in ``root`` (default: Debian's dataset-fashion-mnist, else ./data)
    or ``root/FashionMNIST/raw``: item i of the source items on the left, a seeded random partner on the right.

    Three splits, no item in two: ``val_fraction`` of the training files' items (drawn with ``seed``) are held out
    and make the ``val`` pairs (selection); the other training items make the ``train`` pairs; the t10k files make
    the ``test`` pairs (reported once). Built tensors are cached in ``cache_dir``."""
    split = resolve_split("multi_fashion", split, ("train", "val", "test"))
    if transform is not None:
        raise UserError(
            "data set 'multi_fashion' normalises and augments itself; pass augment/mean/std, not a transform"
        )
    count = {"train": train_size, "val": val_size, "test": test_size}[split]
    if count < 1:
        raise UserError(f"multi_fashion needs train_size, val_size and test_size >= 1, got {split}_size={count}")
    if not 0 < val_fraction < 1:
        raise UserError(
            f"multi_fashion needs 0 < val_fraction < 1 (the training items held out for val), got {val_fraction}"
        )
    if root is None:
        root = FASHION_MNIST_ROOT if os.path.isdir(FASHION_MNIST_ROOT) else DEFAULT_ROOT
    paths = _source_files(Path(root).expanduser(), "test" if split == "test" else "train")
    key = {
        "count": count,
        "seed": seed,
        "split": split,
        "val_fraction": None if split == "test" else val_fraction,
        "sources": [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in paths],
        "format": _FORMAT,
    }
    cache = cache_path(cache_dir or DEFAULT_CACHE, "multi_fashion", key)

    def build() -> dict[str, Tensor]:
        images, labels = _read(paths)
        rows = torch.arange(len(images))
        if split != "test":
            held, kept = held_out(len(images), val_fraction, seed)
            rows = held if split == "val" else kept
        rng = np.random.default_rng([seed, ("train", "val", "test").index(split)])
        pairs = build_pairs(images[rows], labels[rows], count, rng)
        for side in ("left_index", "right_index"):  # indices into the source files
            pairs[side] = rows[pairs[side]]
        return pairs

    tensors = load_or_build(cache, key, build)
    return MultiFashionDataset(tensors["images"], tensors["left"], tensors["right"], augment, mean, std)


def held_out(n: int, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted indices of the ``round(fraction * n)`` training items held out for validation (a seeded permutation)
    and of the rest; both non-empty."""
    size = min(max(round(fraction * n), 1), n - 1)
    if n < 2:
        raise UserError(f"multi_fashion needs at least 2 training items to hold some out for val, got {n}")
    order = torch.from_numpy(np.random.default_rng([seed, 9]).permutation(n))
    return order[:size].sort().values, order[size:].sort().values


def build_pairs(images: Tensor, labels: Tensor, count: int, rng: np.random.Generator) -> dict[str, Tensor]:
    """``count`` overlays (max of the two): uint8 images (N,1,36,36), source indices and labels of both items."""
    n = len(images)
    left = torch.arange(count) % n
    right = torch.from_numpy(rng.integers(0, n, count))
    centre = (CANVAS - ITEM) // 2
    offsets = {
        "left": centre - torch.from_numpy(rng.integers(1, MAX_SHIFT + 1, (count, 2))),
        "right": centre + torch.from_numpy(rng.integers(1, MAX_SHIFT + 1, (count, 2))),
    }
    canvas = torch.zeros(count, CANVAS, CANVAS, dtype=torch.uint8)
    for side, index in (("left", left), ("right", right)):
        offset = offsets[side]
        for oy in offset[:, 0].unique().tolist():
            for ox in offset[:, 1].unique().tolist():
                rows = ((offset[:, 0] == oy) & (offset[:, 1] == ox)).nonzero()[:, 0]
                window = canvas[rows, oy : oy + ITEM, ox : ox + ITEM]
                canvas[rows, oy : oy + ITEM, ox : ox + ITEM] = torch.maximum(window, images[index[rows]])
    return {
        "images": canvas[:, None],
        "left": labels[left].long(),
        "right": labels[right].long(),
        "left_index": left,
        "right_index": right,
    }


def _source_files(root: Path, split: str) -> list[Path]:
    folders = [root, root / "FashionMNIST" / "raw"]
    names = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    paths = [_find(folders, name) for name in names]
    if None in paths:
        raise UserError(
            f"Fashion-MNIST files for multi_fashion not found: expected {names[0]}[.gz] and {names[1]}[.gz] in "
            f"{folders[0]} or {folders[1]}; install them with `apt-get install dataset-fashion-mnist` (into "
            f"{FASHION_MNIST_ROOT}) or set data.root to a folder holding them"
        )
    return paths  # type: ignore[return-value]


def _read(paths: list[Path]) -> tuple[Tensor, Tensor]:
    images, labels = (read_idx(p) for p in paths)
    if (
        images.dtype != torch.uint8
        or images.shape[1:] != (ITEM, ITEM)
        or labels.ndim != 1
        or len(images) != len(labels)
    ):
        raise UserError(
            f"{paths[0]} and {paths[1]} do not hold Fashion-MNIST data: images {tuple(images.shape)} {images.dtype}, "
            f"labels {tuple(labels.shape)}"
        )
    if len(labels) == 0 or not 0 <= int(labels.min()) <= int(labels.max()) < 10:
        raise UserError(f"{paths[1]} has no labels or labels outside 0..9")
    return images, labels
