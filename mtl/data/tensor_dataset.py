"""A data set held in memory as one uint8 image tensor plus integer labels."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.data.transforms import default_transform


class TensorImageDataset(Dataset):
    """Items ``{"image": transform(images[i] as uint8 (C,H,W)), "label": labels[i]}``; images: (N,H,W) or (N,C,H,W)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        classes: Sequence[str],
        transform: Callable[[Any], Tensor] | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise ValueError(f"images must be uint8 (N,H,W) or (N,C,H,W), got {images.dtype} {tuple(images.shape)}")
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.long()
        self.classes = list(classes)
        self.transform = transform if transform is not None else default_transform()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        image = self.images[index]
        if image.ndim == 2:
            image = image.unsqueeze(0)
        return {"image": self.transform(image), "label": self.labels[index].clone()}
