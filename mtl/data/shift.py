"""``data.shift``: one fixed transformation of every model input, to make the domains of a domain-incremental stream.

- ``{permute: seed}``: Permuted MNIST (Goodfellow et al. 2013, "An empirical investigation of catastrophic
  forgetting in gradient-based neural networks"; the protocol of Kirkpatrick et al. 2017, EWC). One permutation
  of the H*W pixel positions, the same for every channel and image, drawn by ``torch.randperm`` from a CPU
  ``torch.Generator`` seeded with ``seed``: it depends on the seed and H*W only (the same on every process).
  Output pixel i is input pixel ``perm[i]``.
- ``{rotate: degrees}``: Rotated MNIST (Lopez-Paz & Ranzato 2017, GEM): every image turned counter-clockwise by
  ``degrees`` about its centre (``torchvision.transforms.v2.functional.rotate``, bilinear, same size). The corners
  are black: bilinear sampling reads the normalised value of a 0 pixel, ``-mean / std``, outside the image, so that
  rotating the normalised input equals normalising the image rotated with black around it (sampling and the
  per-channel normalisation commute).

The shift acts on the model's input tensors (..., C, H, W), after the pipeline's resize, crop and normalisation.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2.functional import rotate

Shift = Callable[[Tensor], Tensor]


def pixel_permutation(seed: int, pixels: int) -> Tensor:
    """The permutation ``{permute: seed}`` applies to images of ``pixels`` = H*W positions (CPU, long)."""
    return torch.randperm(pixels, generator=torch.Generator().manual_seed(seed))


class PermutePixels:
    """``images[..., c, perm]`` on the flattened H*W positions, with ``pixel_permutation(seed, H*W)``."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._perms: Dict[Any, Tensor] = {}  # (H*W, device) -> permutation there

    def __repr__(self) -> str:
        return f"PermutePixels(seed={self.seed})"

    def __call__(self, images: Tensor) -> Tensor:
        key = (images.shape[-2] * images.shape[-1], images.device)
        if key not in self._perms:
            self._perms[key] = pixel_permutation(self.seed, key[0]).to(images.device)
        return images.flatten(-2).index_select(-1, self._perms[key]).view(images.shape)


class Rotate:
    """Every image turned by ``degrees`` (counter-clockwise) about its centre, bilinear, corners filled with
    ``fill`` (one value per channel)."""

    def __init__(self, degrees: float, fill: Sequence[float]) -> None:
        self.degrees, self.fill = float(degrees), [float(f) for f in fill]

    def __repr__(self) -> str:
        return f"Rotate(degrees={self.degrees:g})"

    def __call__(self, images: Tensor) -> Tensor:
        # zero padding around the fill value: bilinear sampling that reads ``fill`` outside the image (torchvision's
        # own ``fill`` also scales the border pixels by the share of the image in their sample)
        fill = torch.tensor(self.fill, dtype=images.dtype, device=images.device)[:, None, None]
        turned = rotate(images - fill, self.degrees, interpolation=InterpolationMode.BILINEAR, expand=False)
        return turned + fill


def build_shift(
    spec: Optional[Mapping[str, Any]], mean: Sequence[float] = (0.0,), std: Sequence[float] = (1.0,)
) -> Optional[Shift]:
    """The shift of a ``data.shift`` that ``DataCfg.check`` accepted (None for null); ``mean`` and ``std``: the
    inputs' normalisation (a rotation's black corners)."""
    if not spec:
        return None
    ((kind, value),) = spec.items()
    if kind == "permute":
        return PermutePixels(int(value))
    return Rotate(value, [-m / s for m, s in zip(mean, std)])


def shifted_collate(collate: Callable[[List[Any]], Dict[str, Any]], shift: Optional[Shift]) -> Callable:
    """``collate`` whose batches' ``"image"`` goes through ``shift`` (``collate`` itself when there is none)."""
    if shift is None:
        return collate

    def collate_shifted(items: List[Any]) -> Dict[str, Any]:
        batch = collate(items)
        return {**batch, "image": shift(batch["image"])}

    return collate_shifted
