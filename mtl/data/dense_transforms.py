"""Joint augmentation and normalisation of an image and its dense targets (multitask data sets).

A *sample* is a dict ``{"image": float (3,H,W) in [0, 1], <target key>: tensor, ...}``. Which entries are targets
and how each moves with the image comes from the data set's target specs (its ``targets`` attribute, ``{key:
{"type": ..., ...}}``): every geometric change asks the target's task type (``mtl.tasks``: ``flip_target``,
``resize_target``, ``crop_target``, ``zoom_target``), never its key name. Image-level targets pass through.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.tasks.base import TASK_TYPES

Specs = Mapping[str, Mapping[str, Any]]  # a data set's targets: key -> {"type": task type, ...}


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(x - mean) / std per channel of a float (3,H,W) image or (B,3,H,W) batch."""
    mean_t = torch.as_tensor(mean, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return (image - mean_t) / std_t


def _targets(sample: Mapping[str, Tensor], specs: Specs):
    """(key, task type class, spec) of every target in ``sample`` that the specs declare."""
    return [(key, TASK_TYPES.get(spec["type"]), spec) for key, spec in specs.items() if key in sample]


def hflip(sample: dict[str, Tensor], specs: Specs) -> dict[str, Tensor]:
    """Mirror the image and every target left-right, as their types say (normals negate x). Items or batches."""
    out = dict(sample)
    if "image" in out:
        out["image"] = out["image"].flip(-1)
    for key, kind, _ in _targets(out, specs):
        out[key] = kind.flip_target(out[key])
    return out


def random_hflip(sample: dict[str, Tensor], specs: Specs, p: float = 0.5) -> dict[str, Tensor]:
    """``hflip`` with probability ``p`` (torch's global RNG, like torchvision's random transforms)."""
    return hflip(sample, specs) if float(torch.rand(())) < p else sample


def resize(sample: dict[str, Tensor], size: Sequence[int], specs: Specs) -> dict[str, Tensor]:
    """Resize the image (bilinear) and every target (as its type says: labels and depth nearest, normals
    bilinear and renormalised) to ``size`` (h, w)."""
    size = (int(size[0]), int(size[1]))
    out = dict(sample)
    if "image" in out and tuple(out["image"].shape[-2:]) != size:
        out["image"] = _bilinear(out["image"], size).clamp_(0, 1)
    for key, kind, _ in _targets(out, specs):
        out[key] = kind.resize_target(out[key], size)
    return out


def random_scale_crop(
    sample: dict[str, Tensor], specs: Specs, scales: Sequence[float] = (1.0, 1.2, 1.5)
) -> dict[str, Tensor]:
    """Zoom in by a random factor of ``scales`` and crop a random window of the original size; each target's
    values change as its type says (depth shrinks by the factor, inverse depth grows)."""
    scale = float(scales[int(torch.randint(len(scales), ()))])
    if scale == 1.0:
        return sample
    h, w = sample["image"].shape[-2:]
    big_h, big_w = round(h * scale), round(w * scale)
    out = resize(sample, (big_h, big_w), specs)
    top, left = _randint(big_h - h), _randint(big_w - w)
    out["image"] = out["image"][..., top : top + h, left : left + w]
    for key, kind, spec in _targets(out, specs):
        out[key] = kind.zoom_target(kind.crop_target(out[key], top, left, h, w), scale, spec)
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
