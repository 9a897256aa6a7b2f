"""``shapes``: procedurally drawn filled shapes of random size, position, rotation and colours."""

from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch
from PIL import Image, ImageDraw
from torch import Tensor
from torchvision.transforms.v2.functional import pil_to_tensor

from mtl.core.errors import UserError
from mtl.data.cache import cache_path, load_or_build
from mtl.data.registry import DATASETS, resolve_split
from mtl.data.tensor_dataset import TensorImageDataset

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon")
DEFAULT_ROOT = "data/shapes"
_SUPERSAMPLE = 4  # drawn this many times larger, then downsampled: antialiased edges
_FORMAT = 1  # bump when the drawing code changes, to invalidate caches


@DATASETS.register("shapes")
def shapes(
    *,
    split: str = "train",
    root: str | None = None,
    transform: Callable[[Any], Tensor] | None = None,
    per_class: int = 200,
    val_per_class: int = 50,
    size: int = 32,
    seed: int = 0,
) -> TensorImageDataset:
    """One class per shape in ``SHAPES``; ``per_class`` train and ``val_per_class`` val images each."""
    split = resolve_split("shapes", split, ("train", "val"), {"test": "val"})
    count = per_class if split == "train" else val_per_class
    if count < 1 or size < 8:
        raise UserError(f"shapes needs per_class and val_per_class >= 1 and size >= 8, got {count} and {size}")
    key = {"count": count, "size": size, "seed": seed, "split": split, "shapes": SHAPES, "format": _FORMAT}
    path = cache_path(root or DEFAULT_ROOT, "shapes", key)
    tensors = load_or_build(path, key, lambda: draw_shapes(count, size, random.Random(f"mtl.shapes/{seed}/{split}")))
    return TensorImageDataset(tensors["images"], tensors["labels"], list(SHAPES), transform)


def draw_shapes(per_class: int, size: int, rng: random.Random) -> dict[str, Tensor]:
    """``per_class`` images of every shape: uint8 images (N,3,size,size), labels (N,) cycling through SHAPES."""
    n = per_class * len(SHAPES)
    labels = torch.arange(n) % len(SHAPES)
    images = torch.empty(n, 3, size, size, dtype=torch.uint8)
    for i in range(n):
        images[i] = pil_to_tensor(_draw(SHAPES[int(labels[i])], size, rng))
    return {"images": images, "labels": labels}


def _draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    background, colour = _contrasting_colours(rng)
    canvas = size * _SUPERSAMPLE
    radius = rng.uniform(0.22, 0.42) * canvas
    cx, cy = rng.uniform(radius, canvas - radius), rng.uniform(radius, canvas - radius)
    angle = rng.uniform(0, 2 * math.pi)
    image = Image.new("RGB", (canvas, canvas), background)
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        vertices = [
            (cx + r * radius * math.cos(angle + a), cy + r * radius * math.sin(angle + a)) for r, a in _polar(shape)
        ]
        draw.polygon(vertices, fill=colour)
    return image.resize((size, size), Image.Resampling.LANCZOS)


def _polar(shape: str) -> list[tuple[float, float]]:
    """The shape's vertices as (radius fraction, angle) pairs around its centre."""
    corners = {"triangle": 3, "square": 4, "hexagon": 6}
    if shape in corners:
        k = corners[shape]
        return [(1.0, 2 * math.pi * j / k) for j in range(k)]
    if shape == "star":
        return [(1.0 if j % 2 == 0 else 0.45, math.pi * j / 5) for j in range(10)]
    if shape == "cross":
        w = 0.3
        arm = [(w, 1.0), (w, w), (1.0, w)]  # one quarter of a plus sign, in (x, y)
        xy = [(x * c - y * s, x * s + y * c) for c, s in ((1, 0), (0, 1), (-1, 0), (0, -1)) for x, y in arm]
        return [(math.hypot(x, y), math.atan2(y, x)) for x, y in xy]
    raise ValueError(shape)


def _contrasting_colours(rng: random.Random) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """A background and a foreground colour whose luminances differ by at least a third of the range."""
    while True:
        a, b = (tuple(rng.randrange(256) for _ in range(3)) for _ in range(2))
        if abs(_luma(a) - _luma(b)) >= 85:
            return a, b  # type: ignore[return-value]


def _luma(rgb: tuple[int, ...]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
