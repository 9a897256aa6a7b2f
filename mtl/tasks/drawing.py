"""Drawing primitives of dense predictions: distinct class colours and a depth colormap."""

from __future__ import annotations

import colorsys

import torch
from torch import Tensor

# viridis at 0, 1/4, 1/2, 3/4, 1: the depth colormap (dark = near, yellow = far)
_VIRIDIS = torch.tensor([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]]) / 255.0


def palette(n: int) -> Tensor:
    """(n, 3) uint8 distinct colours: hues a golden ratio apart, alternating in brightness."""
    colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.95 if i % 2 == 0 else 0.7) for i in range(n)]
    return (torch.tensor(colours).reshape(n, 3) * 255).round().to(torch.uint8)


def colormap(values: Tensor) -> Tensor:
    """(H, W) values -> (3, H, W) viridis colours in [0, 1], scaled from the map's minimum to its maximum."""
    v = values.float()
    lo, hi = v.min(), v.max()
    v = (v - lo) / (hi - lo).clamp(min=1e-12) * (len(_VIRIDIS) - 1)
    i = v.floor().long().clamp(0, len(_VIRIDIS) - 2)
    frac = (v - i).unsqueeze(0)
    return _VIRIDIS[i].permute(2, 0, 1) * (1 - frac) + _VIRIDIS[i + 1].permute(2, 0, 1) * frac
