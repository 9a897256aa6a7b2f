"""``cifar10`` and ``cifar100``: torchvision's loaders, held as one uint8 tensor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torchvision.datasets
from torch import Tensor

from mtl.core.errors import UserError
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.tensor_dataset import TensorImageDataset

DEFAULT_ROOT = "data"


@DATASETS.register("cifar10")
def cifar10(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    download: bool = False,
) -> TensorImageDataset:
    """CIFAR-10 (32x32 colour, 10 classes) from ``root/cifar-10-batches-py``."""
    return _cifar(torchvision.datasets.CIFAR10, "cifar10", split, root, transform, download)


@DATASETS.register("cifar100")
def cifar100(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    download: bool = False,
) -> TensorImageDataset:
    """CIFAR-100 (32x32 colour, 100 fine classes) from ``root/cifar-100-python``."""
    return _cifar(torchvision.datasets.CIFAR100, "cifar100", split, root, transform, download)


def _cifar(
    tv_class: type, name: str, split: str, root: str | None, transform: Any, download: bool
) -> TensorImageDataset:
    split = resolve_split(name, split, ("train", "test"), {"val": "test"})
    root_dir = Path(root or DEFAULT_ROOT).expanduser()
    folder = root_dir / tv_class.base_folder
    try:
        loaded = tv_class(str(root_dir), train=split == "train", download=download)
    except Exception as err:  # torchvision raises RuntimeError when files are missing, URLError/OSError offline
        if download:
            raise UserError(
                f"could not download {name} into {root_dir} ({type(err).__name__}: {err}); check the network, "
                f"or place the extracted {tv_class.base_folder} folder under {root_dir}"
            ) from None
        raise UserError(
            f"{name} not found or corrupt: expected the extracted {folder} ({tv_class.filename} unpacked); "
            f"set data.options.download=true (needs network) or place {tv_class.base_folder} under {root_dir}"
        ) from None
    images = torch.from_numpy(loaded.data).permute(0, 3, 1, 2).contiguous()
    return TensorImageDataset(images, torch.tensor(loaded.targets), list(loaded.classes), transform)
