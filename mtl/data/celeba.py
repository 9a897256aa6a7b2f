"""``celeba``: CelebA face attributes through torchvision, one binary task per attribute (or one multilabel)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torchvision.datasets
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF

from mtl.core.errors import UserError
from mtl.data.decoded import decode_images
from mtl.data.dense_batches import random_flips, to_device
from mtl.data.dense_transforms import normalize
from mtl.data.device_augment import BatchAugment, box_theta
from mtl.data.image_files import load_rgb
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD

DEFAULT_ROOT = "data"
IMAGE_FOLDER = "img_align_celeba"
# torchvision 0.29 reads every one of these in CelebA.__init__, whatever the target type
TEXT_FILES = (
    "list_attr_celeba.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "list_eval_partition.txt",
)
_PARTITIONS = {"train": 0, "valid": 1, "test": 2}  # the column of list_eval_partition.txt
_LAYOUT = f"<root>/celeba/{IMAGE_FOLDER}/*.jpg and <root>/celeba/{{{','.join(TEXT_FILES)}}}"


class _CelebA(torchvision.datasets.CelebA):
    def _check_integrity(self) -> bool:
        # torchvision compares the MD5 of every text file with the official release. We only check that the files
        # exist: hashing is slow on every start, and it rejects small hand-made or re-split copies (and the tests'
        # fake files) whose format is otherwise right. A malformed file still fails when it is parsed.
        folder = os.path.join(self.root, self.base_folder)
        return os.path.isdir(os.path.join(folder, IMAGE_FOLDER)) and all(
            os.path.isfile(os.path.join(folder, name)) for name in TEXT_FILES
        )


class CelebADataset(Dataset):
    """Items ``{"image", <attribute>: 0/1 ...}`` or ``{"image", "attrs": float (K,)}``."""

    def __init__(
        self,
        files: list[str],
        attrs: Tensor,
        names: list[str],
        as_tasks: bool,
        image_size: int,
        augment: bool = False,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        flip: bool = True,
    ) -> None:
        self.files, self.attrs, self.attribute_names = files, attrs, names
        self.as_tasks, self.image_size, self.augment, self.flip = as_tasks, image_size, augment, flip
        self.mean, self.std = tuple(mean), tuple(std)
        if as_tasks:
            self.targets = {n: {"type": "binary", "num_classes": 2, "classes": [f"not {n}", n]} for n in names}
        else:
            self.targets = {"attrs": {"type": "multilabel", "num_classes": len(names), "classes": list(names)}}
            self.classes = list(names)
        self._store: Any = None  # decoded images, for whole batches (``prepare``)
        self._geometry = BatchAugment(
            train=False, augment="none", image_size=image_size, resize_size=image_size, mean=mean, std=std
        )  # Resize + CenterCrop + normalise, as __getitem__

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        try:
            image = TF.pil_to_tensor(load_rgb(self.files[index]))
        except OSError as err:
            raise UserError(f"cannot read CelebA image {self.files[index]} ({err}); extract the images again") from None
        image = TF.center_crop(TF.resize(image, [self.image_size], antialias=True), [self.image_size] * 2)
        if self.augment and float(torch.rand(())) < 0.5 and self.flip:  # drawn without flip too: the same stream
            image = TF.horizontal_flip(image)
        item = {"image": normalize(image.float() / 255, self.mean, self.std)}
        if self.as_tasks:
            item.update({name: self.attrs[index, i].clone() for i, name in enumerate(self.attribute_names)})
        else:
            item["attrs"] = self.attrs[index].float()
        return item

    # ---- whole batches (mtl/data/dense_batches.py): images decoded once, resized, cropped and flipped on the device
    def prepare(
        self,
        *,
        cache_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        budget_bytes: int = 4 << 30,
        progress: bool = True,
    ) -> str:
        """Decode every image once into a uint8 store (``decoded.py``); returns "memory" or the mapped file. A set
        that does not augment stores each image as ``__getitem__`` cuts it (its evaluation view), exactly; one that
        flips stores ``cache_size``² squares that the device resizes and crops."""
        if self._store is None:
            size = cache_size or round(self.image_size * 4 / 3)
            kw = dict(cache_dir=cache_dir, budget_bytes=budget_bytes, progress=progress)
            if self.augment:
                store = decode_images(self.files, size, **kw)
            else:
                store = decode_images(self.files, self.image_size, view_resize=self.image_size, **kw)
            if store.failed:
                raise UserError(
                    f"cannot read CelebA image {self.files[store.failed[0]]} ({len(store.failed)} in all); "
                    "extract the images again"
                )
            self._store = store
        return self._store.location

    @property
    def nbytes(self) -> int:
        """Bytes of the decoded store (0 before ``prepare``)."""
        return self._store.nbytes if self._store is not None else 0

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Random horizontal flips of n items; none without ``flip`` (drawn all the same)."""
        return {"flip": random_flips(n, generator)["flip"] & self.flip}

    def gather(self, rows: Tensor, device: torch.device, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Items ``rows`` as ``__getitem__`` gives them (exactly without augmentation, else up to resampling), on
        ``device``, flipped by ``params``."""
        self.prepare(progress=False)
        if self._store.view_resize is not None:  # evaluation views: __getitem__'s own operations, exactly
            images = to_device(self._store.images[rows], device)
            if params is not None:
                flip = params["flip"].to(device)[:, None, None, None]
                images = torch.where(flip, images.flip(-1), images)
            item = {"image": normalize(images.float() / 255, self.mean, self.std)}
        else:
            item = {"image": self._warped(rows, device, params)}
        attrs = self.attrs[rows].to(device)
        if self.as_tasks:
            item.update({name: attrs[:, i] for i, name in enumerate(self.attribute_names)})
        else:
            item["attrs"] = attrs.float()
        return item

    def _warped(self, rows: Tensor, device: torch.device, params: dict[str, Tensor] | None) -> Tensor:
        """Items ``rows`` resized, cropped and flipped on ``device`` from the ``cache_size``² store."""
        images, sizes = self._store.images[rows], self._store.sizes[rows]
        boxes, flip = self._geometry.boxes(sizes)
        if params is not None:
            flip = params["flip"]
        theta = box_theta(boxes, sizes, flip)
        return self._geometry(to_device(images, device), theta=to_device(theta, device))


@DATASETS.register("celeba")
def celeba(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    augment: bool = False,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    attributes: Sequence[str] | None = None,
    as_tasks: bool = True,
    image_size: int = 64,
    download: bool = False,
    flip: bool = True,
) -> CelebADataset:
    """CelebA's aligned faces resized and centre-cropped to ``image_size``; ``attributes`` (default all 40) as one
    binary target each (``as_tasks``) or one ``attrs`` multilabel target. ``augment`` = horizontal flip (none with
    ``flip`` False)."""
    split = resolve_split("celeba", split, ("train", "valid", "test"), {"val": "valid"})
    if transform is not None:
        raise UserError("data set 'celeba' normalises and augments itself; pass augment/mean/std, not a transform")
    if image_size < 8:
        raise UserError(f"celeba image_size must be >= 8, got {image_size}")
    root_dir = Path(root or DEFAULT_ROOT).expanduser()
    try:
        # split="all" and our own filter: torchvision's split mask breaks on a split of one image
        dataset = _CelebA(str(root_dir), split="all", target_type="attr", download=download)
        partition = dataset._load_csv("list_eval_partition.txt")
    except RuntimeError as err:
        if download:
            raise UserError(
                f"could not download CelebA into {root_dir / 'celeba'} ({err}); check the network and that gdown is "
                f"installed, or place the files as {_LAYOUT}"
            ) from None
        raise UserError(
            f"CelebA not found in {root_dir}: {_missing(root_dir)}; expected {_LAYOUT} "
            f"(or set data.options.download=true, needs network and gdown)"
        ) from None
    except Exception as err:  # download and parse errors come in many types
        action = "download" if download else "read"
        raise UserError(
            f"could not {action} CelebA in {root_dir / 'celeba'} ({type(err).__name__}: {err}); "
            f"place the files as {_LAYOUT}"
        ) from None
    if dataset.attr.shape[0] != len(dataset.filename) or partition.data.shape != (len(dataset.filename), 1):
        raise UserError(
            f"{root_dir / 'celeba' / 'list_eval_partition.txt'} and {TEXT_FILES[0]} do not list the "
            f"same images; get both files again"
        )
    rows = (partition.data[:, 0] == _PARTITIONS[split]).nonzero()[:, 0]
    if len(rows) == 0:
        raise UserError(f"CelebA split {split!r} has no images in {root_dir / 'celeba' / 'list_eval_partition.txt'}")
    known = [name for name in dataset.attr_names if name]
    if dataset.attr.shape[1] != len(known):
        raise UserError(
            f"{root_dir / 'celeba' / TEXT_FILES[0]} names {len(known)} attributes but has "
            f"{dataset.attr.shape[1]} values per image; get it again"
        )
    names = list(known if attributes is None else attributes)
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise UserError(
            f"unknown CelebA attribute(s) {', '.join(unknown) or '(none given)'}; choose from: {', '.join(known)}"
        )
    columns = [known.index(name) for name in names]
    folder = root_dir / "celeba" / IMAGE_FOLDER
    files = [str(folder / dataset.filename[i]) for i in rows.tolist()]
    attrs = dataset.attr[rows][:, columns].long()
    return CelebADataset(files, attrs, names, as_tasks, image_size, augment, mean, std, flip=flip)


def _missing(root_dir: Path) -> str:
    folder = root_dir / "celeba"
    missing = [name for name in TEXT_FILES if not (folder / name).is_file()]
    if not (folder / IMAGE_FOLDER).is_dir():
        missing.insert(0, f"{IMAGE_FOLDER}/")
    return f"missing {', '.join(missing)} in {folder}" if missing else f"files in {folder} are incomplete"
