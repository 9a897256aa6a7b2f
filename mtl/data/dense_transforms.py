"""Joint augmentation and normalisation of an image and its dense targets (multitask data sets).

A *sample* is a dict whose dense entries are recognised by key: ``image`` float (3,H,W) in [0, 1], ``seg``
long (H,W) with -1 = ignore, ``depth`` float (1,H,W) with 0 = invalid, ``normal`` float (3,H,W) unit vectors
with 0 = invalid. Other keys (image-level targets) pass through unchanged.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DENSE_KEYS = ("image", "seg", "depth", "normal")


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel of a float (3,H,W) image or (B,3,H,W) batch."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - mean_t) / std_t


def unit_vectors(x: Tensor, dim: int) -> Tensor:
    """``F.normalize(x, dim=dim)`` (zero vectors stay zero), written out: torch's norm kernel is about 10x slower
    on the CPU when reducing over a strided dimension such as the channels of a normal map."""
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(1e-12)


def hflip(sample: dict[str, Tensor]) -> dict[str, Tensor]:
    """Mirror every dense entry left-right; normals get their x component negated. Items (C,H,W) or batches."""
    out = dict(sample)
    for key in DENSE_KEYS:
        if key in out:
            out[key] = out[key].flip(-1)
    if "normal" in out:
        sign = torch.tensor([-1.0, 1.0, 1.0], dtype=out["normal"].dtype, device=out["normal"].device)
        out["normal"] = out["normal"] * sign.view(3, 1, 1)
    return out


def random_hflip(sample: dict[str, Tensor], p: float = 0.5) -> dict[str, Tensor]:
    """``hflip`` with probability ``p`` (torch's global RNG, like torchvision's random transforms)."""
    return hflip(sample) if float(torch.rand(())) < p else sample


def resize(sample: dict[str, Tensor], size: Sequence[int]) -> dict[str, Tensor]:
    """Resize dense entries to ``size`` (h, w): image and normals bilinear (normals renormalised, invalid
    pixels kept invalid), segmentation and depth nearest (no blending of labels or across depth edges)."""
    size = (int(size[0]), int(size[1]))
    out = dict(sample)
    if "image" in out and tuple(out["image"].shape[-2:]) != size:
        out["image"] = _bilinear(out["image"], size).clamp_(0, 1)
    if "seg" in out and tuple(out["seg"].shape[-2:]) != size:
        out["seg"] = _nearest(out["seg"][None].float(), size)[0].long()
    if "depth" in out and tuple(out["depth"].shape[-2:]) != size:
        out["depth"] = _nearest(out["depth"], size)
    if "normal" in out and tuple(out["normal"].shape[-2:]) != size:
        normal = out["normal"]
        valid = _nearest((normal.abs().sum(0, keepdim=True) > 0).float(), size)
        out["normal"] = unit_vectors(_bilinear(normal, size), dim=0) * valid
    return out


def random_scale_crop(
    sample: dict[str, Tensor], scales: Sequence[float] = (1.0, 1.2, 1.5), inverse_depth: bool = False
) -> dict[str, Tensor]:
    """Zoom in by a random factor of ``scales`` and crop a random window of the original size.

    Depth is divided by the factor (the camera moved closer); with ``inverse_depth`` (disparity) it is
    multiplied instead. Normals and labels keep their values.
    """
    scale = float(scales[int(torch.randint(len(scales), ()))])
    if scale == 1.0:
        return sample
    h, w = sample["image"].shape[-2:]
    big_h, big_w = round(h * scale), round(w * scale)
    out = resize(sample, (big_h, big_w))
    top, left = _randint(big_h - h), _randint(big_w - w)
    for key in DENSE_KEYS:
        if key in out:
            out[key] = out[key][..., top : top + h, left : left + w]
    if "depth" in out:
        out["depth"] = out["depth"] * scale if inverse_depth else out["depth"] / scale
    return out


def random_shift(image: Tensor, max_shift: int) -> Tensor:
    """Translate a (C,H,W) image by up to ``max_shift`` pixels each way, padding with its border pixels."""
    if max_shift <= 0:
        return image
    return shift(image, _randint(2 * max_shift), _randint(2 * max_shift), max_shift)


def shift(image: Tensor, top: int, left: int, max_shift: int) -> Tensor:
    """The (C,H,W) window at (top, left) of ``image`` padded by ``max_shift`` border pixels on every side."""
    h, w = image.shape[-2:]
    padded = F.pad(image[None], (max_shift,) * 4, mode="replicate")[0]
    return padded[..., top : top + h, left : left + w]


def _bilinear(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]


def _nearest(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x[None].float(), size=size, mode="nearest-exact")[0]


def _randint(high: int) -> int:
    """A uniform integer in [0, high]."""
    return int(torch.randint(high + 1, ()))
