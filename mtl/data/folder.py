"""The ``folder`` data set: images in ``root/<split>/<class>/`` as in the PyTorch ants/bees tutorial."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from mtl.core.errors import UserError
from mtl.data.image_files import check_image, is_image_file, load_rgb
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import default_transform

_LAYOUT = "<root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg"
_SHOWN_PATHS = 3


class ImageFolderDataset(Dataset):
    """Labelled image files; a file that fails to load is reported once and replaced by the next readable one."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        classes: list[str],
        transform: Callable[[Any], Tensor] | None = None,
        skipped: list[str] | None = None,
    ) -> None:
        self.samples = samples
        self.classes = classes
        self.labels = torch.tensor([label for _, label in samples], dtype=torch.long)
        self.transform = transform if transform is not None else default_transform()
        self.skipped = list(skipped or [])
        self._failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        for offset in range(len(self.samples)):
            path, label = self.samples[(index + offset) % len(self.samples)]
            if path in self._failed:
                continue
            try:
                image = load_rgb(path)
            except Exception as err:  # any decoder error: the file is bad, not the program
                self._failed.add(path)
                warnings.warn(f"could not read image {path} ({err}); using another image in its place", stacklevel=2)
                continue
            return {"image": self.transform(image), "label": torch.tensor(label)}
        raise UserError(f"none of the {len(self.samples)} images of this data set can be read any more")


@DATASETS.register("folder")
def folder(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    verify: bool = True,
    val_fraction: float = 0.0,
    split_seed: int = 0,
) -> ImageFolderDataset:
    """Images under ``root/<split>/<class>/``; classes are the sorted class folders of ``root/train``.

    With ``val_fraction`` > 0 the layout is ``root/<class>/`` instead, and each class is split at random
    (``split_seed``) into ``train`` and ``val``. ``verify`` decodes every file of the split once while
    building and skips unreadable ones with one warning.
    """
    if root is None:
        raise UserError(f"data set 'folder' needs data.root: a folder laid out as {_LAYOUT}")
    root_dir = Path(root).expanduser()
    if not root_dir.is_dir():
        raise UserError(
            f"data root {root_dir} does not exist or is not a folder; set data.root to a folder laid out as {_LAYOUT}"
        )
    if not 0 <= val_fraction < 1:
        raise UserError(f"data.options.val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction:
        classes, samples = _random_split(root_dir, split, val_fraction, split_seed)
        where = root_dir
    else:
        classes, samples = _split_folder(root_dir, split)
        where = root_dir / split
    skipped: list[str] = []
    if verify:
        samples, skipped = _drop_unreadable(samples)
    if skipped:
        shown = ", ".join(skipped[:_SHOWN_PATHS]) + (", ..." if len(skipped) > _SHOWN_PATHS else "")
        total = len(samples) + len(skipped)
        warnings.warn(
            f"skipped {len(skipped)} of {total} {split} images under {where} that cannot be read: {shown}", stacklevel=2
        )
        if not samples:
            raise UserError(
                f"none of the {total} images under {where} can be read; replace them with valid image files"
            )
        _check_no_empty_class(where, classes, samples, after_skipping=True)
    return ImageFolderDataset(samples, classes, transform, skipped)


def _split_folder(root: Path, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes from ``root/train``, samples from ``root/<split>``."""
    for name in dict.fromkeys(["train", split]):
        if not (root / name).is_dir():
            found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise UserError(
                f"split folder {root / name} does not exist (found: {', '.join(found) or 'nothing'}); expected "
                f"a layout {_LAYOUT}, or <root>/<class>/*.jpg with data.options.val_fraction"
            )
    classes = _class_folders(root / "train")
    if split != "train":
        _check_same_classes(root, split, classes, _class_folders(root / split))
    return classes, _list_images(root / split, classes)


def _random_split(root: Path, split: str, val_fraction: float, seed: int) -> tuple[list[str], list[tuple[str, int]]]:
    """Classes from ``root/<class>/``; each class split at random into train and val, the same for a seed."""
    split = resolve_split("folder", split, ("train", "val"))
    classes = _class_folders(root)
    by_class: list[list[tuple[str, int]]] = [[] for _ in classes]
    for sample in _list_images(root, classes):
        by_class[sample[1]].append(sample)
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for name, members in zip(classes, by_class):
        if len(members) < 2:
            raise UserError(f"class folder {root / name} has only one image; val_fraction needs at least 2 per class")
        n_val = min(max(1, round(len(members) * val_fraction)), len(members) - 1)
        order = torch.randperm(len(members), generator=generator).tolist()
        picked = order[:n_val] if split == "val" else order[n_val:]
        chosen += [members[i] for i in sorted(picked)]
    return classes, chosen


def _list_images(folder: Path, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` of the image files in each class folder and its subfolders, in torchvision's
    ``make_dataset`` order. A class folder may be a symlink, but symlinked folders inside it are not searched: one
    pointing back up (``red/loop -> ..``) would loop and list other classes' images as this class."""
    samples: list[tuple[str, int]] = []
    links: list[str] = []
    split_real = os.path.realpath(folder)
    for index, name in enumerate(classes):
        class_dir = os.path.join(folder, name)
        real = os.path.realpath(class_dir)
        if split_real == real or split_real.startswith(real.rstrip(os.sep) + os.sep):
            raise UserError(
                f"class folder {class_dir} is a link to {real}, which holds {folder} itself; "
                f"link it to that class's images only"
            )
        for root, dirs, files in sorted(os.walk(class_dir)):  # os.walk does not descend into symlinked folders
            links += [os.path.join(root, d) for d in sorted(dirs) if os.path.islink(os.path.join(root, d))]
            samples += [(path, index) for path in (os.path.join(root, f) for f in sorted(files)) if is_image_file(path)]
    if links:
        shown = ", ".join(links[:_SHOWN_PATHS]) + (", ..." if len(links) > _SHOWN_PATHS else "")
        warnings.warn(
            f"did not search {len(links)} symlinked folder(s) inside class folders of {folder}: {shown}; "
            f"images are listed from real subfolders only (link the image files or the whole class folder "
            f"instead)",
            stacklevel=2,
        )
    _check_no_empty_class(folder, classes, samples)
    return samples


def _class_folders(folder: Path) -> list[str]:
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise UserError(
            f"no class folders in {folder}; put each class's images in its own folder: {folder}/<class>/*.jpg"
        )
    return classes


def _check_same_classes(root: Path, split: str, classes: list[str], split_classes: list[str]) -> None:
    missing = [c for c in classes if c not in split_classes]
    extra = [c for c in split_classes if c not in classes]
    if missing or extra:
        parts = [f"in train but not in {split}: {', '.join(missing)}"] if missing else []
        parts += [f"in {split} but not in train: {', '.join(extra)}"] if extra else []
        raise UserError(
            f"class folders of {root / 'train'} and {root / split} differ ({'; '.join(parts)}); "
            f"every split needs the same class folders"
        )


def _check_no_empty_class(
    split_dir: Path, classes: list[str], samples: list[tuple[str, int]], after_skipping: bool = False
) -> None:
    present = {label for _, label in samples}
    empty = [str(split_dir / name) for i, name in enumerate(classes) if i not in present]
    if empty:
        what = "no readable images" if after_skipping else f"no images ({' '.join(IMG_EXTENSIONS)})"
        raise UserError(
            f"class folder(s) {', '.join(empty)} hold {what}; add images or remove the class from every split"
        )


def _drop_unreadable(samples: list[tuple[str, int]]) -> tuple[list[tuple[str, int]], list[str]]:
    """Split samples into readable ones and the paths of unreadable ones; decodes in threads (PIL drops the GIL)."""
    with warnings.catch_warnings(), ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        warnings.simplefilter("ignore")  # decoder chatter ("Possibly corrupt EXIF data", ...) on files that do load
        readable = list(pool.map(_readable, (path for path, _ in samples)))
    kept = [s for s, ok in zip(samples, readable) if ok]
    skipped = [path for (path, _), ok in zip(samples, readable) if not ok]
    return kept, skipped


def _readable(path: str) -> bool:
    try:
        check_image(path)
    except Exception:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError, ...)
        return False
    return True
