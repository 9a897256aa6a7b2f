"""``mnist`` and ``fashion_mnist``: IDX files read straight into one uint8 tensor."""

from __future__ import annotations

import functools
import gzip
import os
import struct
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision.datasets
from torch import Tensor

from mtl.core.errors import UserError
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.tensor_dataset import TensorImageDataset

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
DEFAULT_ROOT = "data"
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILE_PREFIX = {"train": "train", "test": "t10k"}


@DATASETS.register("fashion_mnist")
def fashion_mnist(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    download: bool = False,
) -> TensorImageDataset:
    """Fashion-MNIST (28x28 grey, 10 classes) from IDX files in ``root`` or ``root/FashionMNIST/raw``."""
    if root is None:
        root = FASHION_MNIST_ROOT if os.path.isdir(FASHION_MNIST_ROOT) else DEFAULT_ROOT
    apt = f"install them with `apt-get install dataset-fashion-mnist` (into {FASHION_MNIST_ROOT}) or "
    return _idx_dataset(
        torchvision.datasets.FashionMNIST, "fashion_mnist", "Fashion-MNIST", split, root, transform, download, apt
    )


@DATASETS.register("mnist")
def mnist(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    download: bool = False,
) -> TensorImageDataset:
    """MNIST digits (28x28 grey, 10 classes) from IDX files in ``root`` or ``root/MNIST/raw``."""
    return _idx_dataset(torchvision.datasets.MNIST, "mnist", "MNIST", split, root or DEFAULT_ROOT, transform, download)


def _idx_dataset(
    tv_class: type, name: str, title: str, split: str, root: str, transform: Any, download: bool, install_hint: str = ""
) -> TensorImageDataset:
    split = resolve_split(name, split, ("train", "test"), {"val": "test"})
    root_dir = Path(root).expanduser()
    folders = [root_dir, root_dir / tv_class.__name__ / "raw"]
    names = [f"{_FILE_PREFIX[split]}-images-idx3-ubyte", f"{_FILE_PREFIX[split]}-labels-idx1-ubyte"]
    paths = [_find(folders, name) for name in names]
    if None in paths and download:
        try:
            tv_class(str(root_dir), train=split == "train", download=True)
        except Exception as err:  # network and archive errors come in many types
            raise UserError(
                f"could not download {title} into {folders[1]} ({type(err).__name__}: {err}); "
                f"check the network or place {names[0]}[.gz] and {names[1]}[.gz] in {root_dir}"
            ) from None
        paths = [_find(folders, name) for name in names]
    if None in paths:
        raise UserError(
            f"{title} files not found: expected {names[0]}[.gz] and {names[1]}[.gz] in {folders[0]} or {folders[1]}; "
            f"{install_hint}set data.options.download=true (needs network)"
        )
    images, labels = (read_idx(p) for p in paths)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels) or images.dtype != torch.uint8:
        raise UserError(
            f"{paths[0]} and {paths[1]} do not hold {title} data: images {tuple(images.shape)} {images.dtype}, "
            f"labels {tuple(labels.shape)}"
        )
    classes = list(tv_class.classes)
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise UserError(f"{paths[1]} has labels outside 0..{len(classes) - 1}")
    return TensorImageDataset(images, labels, classes, transform)


def _find(folders: list[Path], name: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def read_idx(path: str | os.PathLike) -> Tensor:
    """Parse an IDX file (plain or .gz) into a tensor; parsed files are cached per process."""
    stat = os.stat(path)
    return _read_idx_cached(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _read_idx_cached(path: str, mtime_ns: int, size: int) -> Tensor:
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise UserError(f"cannot read IDX file {path} ({err}); delete it and get it again") from None
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_DTYPES:
        raise UserError(f"{path} is not an IDX file (bad magic number); delete it and get it again")
    ndim = data[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", data[4:header]) if len(data) >= header else None
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    if shape is None or len(data) - header != int(np.prod(shape)) * dtype.itemsize:
        raise UserError(f"IDX file {path} is truncated or has trailing bytes; delete it and get it again")
    array = np.frombuffer(data, dtype=dtype, offset=header).astype(dtype.newbyteorder("="))
    return torch.from_numpy(array.reshape(shape))
