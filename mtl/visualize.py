"""Image grids for people: predictions titled with their class, as the tutorials' ``visualize_model``."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms.v2.functional import to_image, to_pil_image
from torchvision.utils import make_grid


def prediction_grid(images: Tensor, preds: Tensor, targets: Tensor, classes: Sequence[str], min_size: int = 96) -> Tensor:
    """(N, 3, H, W) images in [0, 1] -> one (3, H', W') grid; green title if right, red if wrong."""
    if images.shape[-1] < min_size:
        images = F.interpolate(images, scale_factor=min_size / images.shape[-1], mode="nearest")
    tiles = []
    for img, p, t in zip(images, preds.tolist(), targets.tolist()):
        pil = to_pil_image(img)
        draw = ImageDraw.Draw(pil)
        name = lambda i: classes[i] if i < len(classes) else str(i)
        text = name(p) if p == t else f"{name(p)} (true {name(t)})"
        draw.rectangle([0, 0, pil.width, 12], fill=(0, 0, 0))
        draw.text((2, 0), text, fill=(80, 220, 80) if p == t else (240, 80, 80))
        tiles.append(to_image(pil))
    return make_grid(torch.stack(tiles), nrow=min(8, len(tiles)), padding=2)
