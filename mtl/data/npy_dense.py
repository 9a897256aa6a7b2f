"""``nyuv2`` and ``cityscapes``: the preprocessed ``.npy`` layout of mtan / LibMTL, loaded lazily per item.

Layout: ``root/{train,val}/image/{i}.npy`` (float H x W x 3 in [0, 1]), ``label*/{i}.npy`` (H x W, -1 = ignore),
``depth/{i}.npy`` (H x W x 1, 0 = invalid) and, for NYUv2, ``normal/{i}.npy`` (H x W x 3 unit vectors).
mtan's Cityscapes has ``label_7`` and ``label_19`` folders and inverse depth (disparity); LibMTL's repack
names its 7-class folder ``label``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.core.errors import UserError
from mtl.data.dense_transforms import normalize, random_hflip, random_scale_crop, resize
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

NYUV2_CLASSES = (
    "bed", "books", "ceiling", "chair", "floor", "furniture", "objects",
    "picture", "sofa", "table", "tv", "wall", "window",
)  # fmt: skip
CITYSCAPES_7 = ("flat", "construction", "object", "nature", "sky", "human", "vehicle")
CITYSCAPES_19 = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip
CITYSCAPES_LABELS = {"label_7": CITYSCAPES_7, "label_19": CITYSCAPES_19, "label": CITYSCAPES_7}
SCALES = (1.0, 1.2, 1.5)  # mtan's random scale-crop factors


class NpyDenseDataset(Dataset):
    """Items ``{"image", "seg", "depth"[, "normal"]}`` read from ``folder/<kind>/<i>.npy`` on demand."""

    def __init__(
        self,
        folder: Path,
        names: list[str],
        subfolders: dict[str, str],
        classes: Sequence[str],
        size: Sequence[int] | None = None,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        inverse_depth: bool = False,
        flip: bool = True,
    ) -> None:
        self.folder, self.names, self.subfolders = folder, names, subfolders
        self.classes = list(classes)
        self.size = None if size is None else (int(size[0]), int(size[1]))
        self.augment, self.inverse_depth, self.flip = augment, inverse_depth, flip
        self.mean, self.std = tuple(mean), tuple(std)
        self.targets: dict[str, dict] = {
            "seg": {"type": "segmentation", "num_classes": len(self.classes), "classes": list(self.classes)},
            "depth": {"type": "depth", **({"inverse": True} if inverse_depth else {})},  # disparity: zooms inversely
        }
        if "normal" in subfolders:
            self.targets["normal"] = {"type": "normals"}

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        arrays = {key: self._load(sub, index) for key, sub in self.subfolders.items()}
        sample = {"image": _channels_first(arrays["image"]).float(), "seg": torch.from_numpy(arrays["seg"]).long()}
        sample["depth"] = _channels_first(arrays["depth"]).float()
        if "normal" in arrays:
            sample["normal"] = _channels_first(arrays["normal"]).float()
        if self.size is not None:
            sample = resize(sample, self.size, self.targets)
        if self.augment:
            scaled = random_scale_crop(sample, self.targets, SCALES)
            sample = random_hflip(scaled, self.targets, p=0.5 if self.flip else 0.0)
        sample["image"] = normalize(sample["image"], self.mean, self.std)
        return sample

    def _load(self, subfolder: str, index: int) -> np.ndarray:
        path = self.folder / subfolder / f"{self.names[index]}.npy"
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {path} ({err}); re-extract the data set") from None


@DATASETS.register("nyuv2")
def nyuv2(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: Sequence[int] | None = None,
    flip: bool = True,
) -> NpyDenseDataset:
    """NYUv2 (13 classes) preprocessed by mtan; targets ``seg``, ``depth``, ``normal``. ``size`` [h, w] resizes;
    ``augment`` = mtan's random scale-crop (1, 1.2, 1.5) + horizontal flip (no flip with ``flip`` False)."""
    subfolders = {"image": "image", "seg": "label", "depth": "depth", "normal": "normal"}
    folder, names = _open("nyuv2", split, root, transform, size, subfolders)
    return NpyDenseDataset(folder, names, subfolders, NYUV2_CLASSES, size, augment, mean, std, flip=flip)


@DATASETS.register("cityscapes")
def cityscapes(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    size: Sequence[int] | None = None,
    label_dir: str = "label_7",
    flip: bool = True,
) -> NpyDenseDataset:
    """Cityscapes preprocessed by mtan (``label_7``/``label_19``) or LibMTL (``label``, 7 classes); targets ``seg``
    and ``depth`` (inverse depth, as preprocessed). ``augment`` = random scale-crop + horizontal flip (no flip with
    ``flip`` False)."""
    if label_dir not in CITYSCAPES_LABELS:
        raise UserError(f"cityscapes label_dir must be one of {', '.join(CITYSCAPES_LABELS)}, got {label_dir!r}")
    subfolders = {"image": "image", "seg": label_dir, "depth": "depth"}
    folder, names = _open("cityscapes", split, root, transform, size, subfolders)
    classes = CITYSCAPES_LABELS[label_dir]
    return NpyDenseDataset(folder, names, subfolders, classes, size, augment, mean, std, inverse_depth=True, flip=flip)


def _open(
    name: str, split: str, root: str | None, transform: Any, size: Sequence[int] | None, subfolders: dict[str, str]
) -> tuple[Path, list[str]]:
    """Check the layout of ``root/<split>/``; return that folder and the item names common to all subfolders."""
    split = resolve_split(name, split, ("train", "val"), {"test": "val"})
    layout = f"<root>/{{train,val}}/{{{','.join(subfolders.values())}}}/<i>.npy"
    if transform is not None:
        raise UserError(f"data set {name!r} normalises and augments itself; pass augment/mean/std, not a transform")
    if size is not None and (len(size) != 2 or min(size) < 1):
        raise UserError(f"{name} size must be [height, width] of positive integers or null, got {size!r}")
    if root is None:
        raise UserError(f"data set {name!r} needs data.root: the preprocessed folder laid out as {layout}")
    folder = Path(root).expanduser() / split
    if not folder.parent.is_dir():
        raise UserError(
            f"{name} data root {folder.parent} does not exist; set data.root to a folder laid out as {layout}"
        )
    if not folder.is_dir():
        raise UserError(f"{name}: split folder {folder} is missing; data.root must be laid out as {layout}")
    counts: dict[str, list[str]] = {}
    for sub in subfolders.values():
        path = folder / sub
        if not path.is_dir():
            raise UserError(f"{name}: folder {path} is missing; data.root must be laid out as {layout}")
        counts[sub] = sorted((p.stem for p in path.glob("*.npy")), key=_natural)
    image_names = counts[subfolders["image"]]
    if not image_names:
        raise UserError(f"{name}: no .npy files in {folder / subfolders['image']}; expected {layout}")
    for sub, names in counts.items():
        if len(names) != len(image_names):
            raise UserError(
                f"{name}: {folder / subfolders['image']} has {len(image_names)} .npy files but {folder / sub} has "
                f"{len(names)}; every subfolder needs one file per image"
            )
        if names != image_names:
            missing = sorted(set(image_names) - set(names), key=_natural)[0]
            raise UserError(f"{name}: {folder / sub} has no {missing}.npy to match {folder / subfolders['image']}")
    return folder, image_names


def _natural(stem: str) -> tuple[int, str]:
    """Sort 2 before 10 (mtan names files by index)."""
    return (int(stem), "") if stem.isdigit() else (1 << 62, stem)


def _channels_first(array: np.ndarray) -> Tensor:
    """H x W x C (or H x W) -> (C, H, W)."""
    tensor = torch.from_numpy(np.ascontiguousarray(array))
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)
