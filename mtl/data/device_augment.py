"""Batch augmentation on the batch's own device: every crop, resize and flip is one affine sampling.

Crop boxes are computed in ORIGINAL-pixel coordinates, exactly as torchvision would on the original image, then
expressed in normalised [-1, 1] coordinates as an affine ``theta`` (B, 2, 3) for ``F.affine_grid`` and
``F.grid_sample`` (``align_corners=False``). Normalised coordinates do not depend on the stored resolution, so a
batch stored resized (aspect distorted, e.g. by the decode cache) gives the same geometry as the original image.

Pixel convention: a box (top, left, height, width) in an H x W image covers normalised x from 2*left/W - 1 to
2*(left+width)/W - 1, so theta's x row is [s*width/W, 0, (2*left + width)/W - 1] with s = -1 when flipped (the
mirror is within the box), and likewise the y row. Output pixel k of S then samples the image at pixel index
left + (k + 0.5) * width / S - 0.5, the same positions as torchvision's crop + bilinear resize.

Deviation from torchvision: sampling does not antialias when it shrinks the image (``antialias=False``).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.data.batch_autoaugment import BatchAutoAugment, BatchRandomErasing, draw_all
from mtl.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _augmentation
from mtl.tasks.normals import unit_vectors

__all__ = ["BatchAugment", "box_theta", "warp", "warp_depth", "warp_labels", "warp_normals"]

_ATTEMPTS = 10  # RandomResizedCrop tries before its central-crop fallback, as in torchvision


class BatchAugment:
    """Whole-batch replacement of ``build_transforms``: uint8 (B, C, h, w) -> normalised float (B, 3, S, S).

    ``augment`` (train only): ``random_resized_crop`` = RandomResizedCrop(S, scale, ratio) + flip;
    ``random_crop`` = Resize(resize_size) + RandomCrop(S, padding=crop_padding, pad_if_needed=True) + flip;
    ``none`` and eval = Resize(resize_size) + CenterCrop(S). Random numbers come from the CPU ``generator``.
    ``flip`` False: no image is mirrored; the flip flags are still drawn (and ignored), so the crops and every later
    draw are those of a run with flips.

    Train only, in torchvision's ClassificationPresetTrain order: ``auto_augment`` (trivial | randaugment | augmix,
    ``auto_augment_options``) on the cropped images rounded to uint8, then normalisation, then ``random_erasing``
    (a probability); their per-image parameters come from ``draw`` (``mtl/data/batch_autoaugment.py``).
    """

    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def __init__(
        self,
        *,
        train: bool,
        augment: bool | str = "random_resized_crop",
        image_size: int = 224,
        resize_size: int = 256,
        crop_padding: int = 0,
        flip: bool = True,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        auto_augment: Optional[str] = None,
        auto_augment_options: Optional[Mapping[str, Any]] = None,
        random_erasing: float = 0.0,
    ) -> None:
        mode = _augmentation(augment)  # validated in eval too: a bad name is a config error either way
        self.train = bool(train)
        self.augment = mode if self.train else "none"
        self.image_size = _positive_int("image_size", image_size)
        self.resize_size = _positive_int("resize_size", resize_size)
        if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
            raise UserError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
        self.crop_padding = crop_padding
        self.flip = bool(flip)
        self.mean = _channel_stats("mean", mean)
        self.std = _channel_stats("std", std)
        if bool((self.std == 0).any()):
            raise UserError(f"std must be non-zero in every channel, got {list(std)}")
        size = (self.image_size, self.image_size)
        self.auto_augment = BatchAutoAugment(auto_augment, auto_augment_options, size) if auto_augment else None
        if auto_augment is None and auto_augment_options:
            raise UserError("auto_augment_options need an auto_augment policy")
        self.random_erasing = BatchRandomErasing(random_erasing, size) if random_erasing else None
        if not self.train:  # evaluation never augments
            self.auto_augment = self.random_erasing = None

    def __repr__(self) -> str:
        return (
            f"BatchAugment(train={self.train}, augment={self.augment!r}, image_size={self.image_size}, "
            f"resize_size={self.resize_size}, crop_padding={self.crop_padding}, flip={self.flip}, "
            f"auto_augment={self.auto_augment}, random_erasing={self.random_erasing})"
        )

    def draw(self, n: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """The per-image parameters of auto-augment and random erasing for ``n`` images, on the CPU ({}: none);
        drawn after ``theta``, for the whole global batch."""
        return draw_all([p for p in (self.auto_augment, self.random_erasing) if p is not None], n, generator)

    def boxes(self, sizes: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(B, 4) float64 boxes (top, left, height, width) in original pixels and (B,) bool flip flags."""
        height, width = _check_sizes(sizes)
        if self.augment == "random_resized_crop":
            box = self._resized_crop_boxes(height, width, generator)
        elif self.augment == "random_crop":
            box = self._random_crop_boxes(height, width, generator)
        else:
            return self._center_crop_boxes(height, width), torch.zeros(len(height), dtype=torch.bool)
        flip = torch.rand(len(height), generator=generator) < 0.5  # drawn either way: the stream stays the same
        return box, flip & self.flip

    def theta(self, sizes: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 2, 3) float32 affine parameters on the CPU for a batch of original ``sizes`` (B, 2) = (H, W)."""
        box, flip = self.boxes(sizes, generator)
        return box_theta(box, sizes, flip)

    def __call__(
        self,
        images: Tensor,
        sizes: Tensor | None = None,
        generator: torch.Generator | None = None,
        theta: Tensor | None = None,
        draws: Mapping[str, Tensor] | None = None,
    ) -> Tensor:
        """Augment and normalise a batch; ``sizes`` defaults to the tensor's own (h, w); a given ``theta`` wins, and
        so do given ``draws`` (of ``draw``; drawn from ``generator`` after theta when None).

        uint8 images are divided by 255; float images are taken to be in [0, 1] already.
        """
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise UserError(f"images must be (B, 1 or 3, H, W), got shape {tuple(images.shape)}")
        batch = images.shape[0]
        if theta is None:
            if sizes is None:
                sizes = torch.tensor(images.shape[-2:]).expand(batch, 2)
            theta = self.theta(sizes, generator)
        if tuple(theta.shape) != (batch, 2, 3):
            raise UserError(f"theta must have shape ({batch}, 2, 3) for this batch, got {tuple(theta.shape)}")
        if draws is None:
            draws = self.draw(batch, generator)
        out = warp(images, theta, self.image_size)
        if out.shape[1] == 1:
            out = out.expand(-1, 3, -1, -1)
        scale = 1 / 255 if images.dtype == torch.uint8 else 1.0
        if self.auto_augment is not None:  # on the crop as uint8, as torchvision's policies take it
            out = self.auto_augment((out * (scale * 255)).round_().clamp_(0, 255).to(torch.uint8), draws)
            scale = 1 / 255
        mean = self.mean.to(out.device).view(1, -1, 1, 1)
        std = self.std.to(out.device).view(1, -1, 1, 1)
        out = (out * scale - mean) / std
        return self.random_erasing(out, draws) if self.random_erasing is not None else out

    def normalise(self, views: Tensor) -> Tensor:
        """Evaluation views, uint8 (B, 1 or 3, S, S) already cut as the eval transform cuts them (``image_store``'s
        ``view``), -> normalised float (B, 3, S, S) by the float operations of the per-item path: torchvision's
        ``ToDtype(float32, scale=True)`` (times 1/255) and ``Normalize`` (minus mean, divided by std)."""
        size = (self.image_size, self.image_size)
        if self.train or views.dtype != torch.uint8 or views.dim() != 4 or views.shape[1] not in (1, 3):
            raise UserError(
                f"normalise takes uint8 evaluation views (B, 1 or 3, H, W), got {views.dtype} {views.shape}"
            )
        if tuple(views.shape[-2:]) != size:
            raise UserError(f"evaluation views must be {size[0]}x{size[1]}, got {tuple(views.shape[-2:])}")
        out = views.expand(-1, 3, -1, -1).to(torch.float32).mul_(1 / 255)
        mean = self.mean.to(out.device).view(1, -1, 1, 1)
        std = self.std.to(out.device).view(1, -1, 1, 1)
        return out.sub_(mean).div_(std)

    def _resized_crop_boxes(self, height: Tensor, width: Tensor, generator: torch.Generator | None) -> Tensor:
        # torchvision's RandomResizedCrop.get_params, with all attempts of all items drawn at once.
        batch = len(height)
        low, high = self.scale
        area = (height * width)[:, None] * (low + (high - low) * _uniform((batch, _ATTEMPTS), generator))
        log_low, log_high = math.log(self.ratio[0]), math.log(self.ratio[1])
        ratio = torch.exp(log_low + (log_high - log_low) * _uniform((batch, _ATTEMPTS), generator))
        w = torch.round(torch.sqrt(area * ratio))
        h = torch.round(torch.sqrt(area / ratio))
        fits = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first attempt that fits
        found = fits.any(dim=1)
        fallback_h, fallback_w = self._fallback_size(height, width)
        h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
        w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)
        position = _uniform((batch, 2), generator)
        top = torch.where(found, _randint(position[:, 0], height - h + 1), torch.floor((height - h) / 2))
        left = torch.where(found, _randint(position[:, 1], width - w + 1), torch.floor((width - w) / 2))
        return torch.stack([top, left, h, w], dim=1)

    def _fallback_size(self, height: Tensor, width: Tensor) -> tuple[Tensor, Tensor]:
        # Central crop with the aspect ratio clamped to the range; the whole image when it is inside.
        low, high = min(self.ratio), max(self.ratio)
        aspect = width / height
        narrow, wide = aspect < low, aspect > high
        h = torch.where(narrow, torch.round(width / low), height)
        w = torch.where(wide, torch.round(height * high), width)
        return h, w

    def _random_crop_boxes(self, height: Tensor, width: Tensor, generator: torch.Generator | None) -> Tensor:
        # Resize(resize_size) + RandomCrop(S, padding, pad_if_needed=True): offsets in resized pixels, mapped back.
        new_h, new_w = _resized_shape(height, width, self.resize_size)
        position = _uniform((len(height), 2), generator)
        top = _crop_start(position[:, 0], new_h, self.image_size, self.crop_padding)
        left = _crop_start(position[:, 1], new_w, self.image_size, self.crop_padding)
        return _to_original(top, left, new_h, new_w, height, width, self.image_size)

    def _center_crop_boxes(self, height: Tensor, width: Tensor) -> Tensor:
        # Resize(resize_size) + CenterCrop(S), zero padding when S exceeds a resized side.
        new_h, new_w = _resized_shape(height, width, self.resize_size)
        top = _center_start(new_h, self.image_size)
        left = _center_start(new_w, self.image_size)
        return _to_original(top, left, new_h, new_w, height, width, self.image_size)


def box_theta(boxes: Tensor, sizes: Tensor, flip: Tensor) -> Tensor:
    """(B, 2, 3) float32 theta sampling ``boxes`` (top, left, height, width) of images of ``sizes`` (H, W)."""
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise UserError(f"boxes must be (B, 4) = (top, left, height, width), got shape {tuple(boxes.shape)}")
    height, width = _check_sizes(sizes)
    if len(height) != len(boxes) or torch.as_tensor(flip).numel() != len(boxes):
        raise UserError(
            f"boxes, sizes and flip must have the same length, got {len(boxes)}, {len(height)}, "
            f"{torch.as_tensor(flip).numel()}"
        )
    top, left, h, w = boxes.detach().cpu().to(torch.float64).unbind(1)
    sign = 1.0 - 2.0 * torch.as_tensor(flip).cpu().reshape(-1).to(torch.float64)
    theta = torch.zeros(len(boxes), 2, 3, dtype=torch.float64)
    theta[:, 0, 0] = sign * w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    return theta.to(device=boxes.device, dtype=torch.float32)


def warp(
    x: Tensor, theta: Tensor, size: int | tuple[int, int], mode: str = "bilinear", padding_mode: str = "zeros"
) -> Tensor:
    """Sample float (B, C, size) from x (B, C, H, W) through ``theta``; integer inputs are converted to float.

    With ``padding_mode="zeros"`` points outside the image are exactly 0 while points inside interpolate with
    the edge pixels clamped (as torchvision resizes, then zero-pads), not blended with the zeros outside.
    """
    x = x if x.is_floating_point() else x.float()
    grid = _grid(theta, x, size)
    if padding_mode != "zeros":
        return F.grid_sample(x, grid, mode=mode, padding_mode=padding_mode, align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    return out.masked_fill(~_inside(grid)[:, None], 0.0)


def warp_labels(seg: Tensor, theta: Tensor, size: int | tuple[int, int], ignore_index: int = -1) -> Tensor:
    """Nearest-sample long labels (B, H, W) -> (B, *size); points outside the image get ``ignore_index``."""
    if seg.dim() != 3:
        raise UserError(f"seg must be (B, H, W) labels, got shape {tuple(seg.shape)}")
    labels = seg[:, None].float()
    grid = _grid(theta, labels, size)
    out = F.grid_sample(labels, grid, mode="nearest", padding_mode="border", align_corners=False)[:, 0]
    return out.round().long().masked_fill(~_inside(grid), ignore_index)


def warp_depth(depth: Tensor, theta: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Nearest-sample depth (B, 1, H, W) (0 = invalid, never blended across edges); outside the image -> 0."""
    if depth.dim() != 4 or depth.shape[1] != 1:
        raise UserError(f"depth must be (B, 1, H, W), got shape {tuple(depth.shape)}")
    return warp(depth, theta, size, mode="nearest")


def warp_normals(normal: Tensor, theta: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Bilinear-sample unit normals (B, 3, H, W), renormalised; x negated where flipped; invalid/outside -> 0."""
    if normal.dim() != 4 or normal.shape[1] != 3:
        raise UserError(f"normal must be (B, 3, H, W), got shape {tuple(normal.shape)}")
    normal = normal if normal.is_floating_point() else normal.float()
    valid = warp((normal.abs().sum(1, keepdim=True) > 0).to(normal.dtype), theta, size, mode="nearest") > 0.5
    out = unit_vectors(warp(normal, theta, size), dim=1)
    flipped = (theta[:, 0, 0] < 0).to(out.device)
    sign = torch.ones(len(out), 3, 1, 1, dtype=out.dtype, device=out.device)
    sign[:, 0, 0, 0] = torch.where(flipped, -1.0, 1.0).to(out.dtype)
    return out * sign * valid


def _grid(theta: Tensor, x: Tensor, size: int | tuple[int, int]) -> Tensor:
    out_h, out_w = _pair(size)
    if theta.dim() != 3 or tuple(theta.shape[1:]) != (2, 3) or len(theta) != len(x):
        raise UserError(f"theta must be ({len(x)}, 2, 3) for a batch of {len(x)}, got shape {tuple(theta.shape)}")
    theta = theta.to(device=x.device, dtype=x.dtype)
    return F.affine_grid(theta, [len(x), x.shape[1], out_h, out_w], align_corners=False)


def _inside(grid: Tensor) -> Tensor:
    """(B, h, w) bool: the grid point lies on the image (normalised coordinates within [-1, 1])."""
    return (grid.abs() <= 1).all(dim=-1)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise UserError(f"size must be a positive int or (height, width) of positive ints, got {size!r}")
    return pair


def _check_sizes(sizes: Tensor) -> tuple[Tensor, Tensor]:
    """(H, W) float64 CPU tensors from (B, 2) original sizes."""
    sizes = torch.as_tensor(sizes)
    if sizes.dim() != 2 or sizes.shape[1] != 2:
        raise UserError(f"sizes must be (B, 2) original (height, width) per image, got shape {tuple(sizes.shape)}")
    sizes = sizes.detach().cpu().to(torch.float64)
    if bool((sizes < 1).any()):
        raise UserError("sizes must be positive (height, width) per image; got a zero or negative size")
    return sizes[:, 0], sizes[:, 1]


def _uniform(shape: tuple[int, int], generator: torch.Generator | None) -> Tensor:
    return torch.rand(shape, generator=generator, dtype=torch.float64)


def _randint(u: Tensor, count: Tensor) -> Tensor:
    """A uniform integer in [0, count) per item from uniforms ``u`` in [0, 1)."""
    return torch.minimum(torch.floor(u * count), count - 1)


def _resized_shape(height: Tensor, width: Tensor, size: int) -> tuple[Tensor, Tensor]:
    # torchvision Resize(int): the shorter side becomes size, the longer int(size * long / short).
    long = torch.floor(size * torch.maximum(height, width) / torch.minimum(height, width))
    short = torch.full_like(height, float(size))
    portrait = width <= height
    return torch.where(portrait, long, short), torch.where(portrait, short, long)


def _crop_start(u: Tensor, length: Tensor, crop: int, padding: int) -> Tensor:
    """RandomCrop's offset along one axis, in resized pixels (negative = inside the zero padding)."""
    extra = torch.clamp(crop - (length + 2 * padding), min=0)  # pad_if_needed pads both sides by this
    before = padding + extra
    padded = length + 2 * before
    return _randint(u, padded - crop + 1) - before


def _center_start(length: Tensor, crop: int) -> Tensor:
    """CenterCrop's offset along one axis, in resized pixels (negative when it pads)."""
    return torch.where(crop > length, -torch.floor((crop - length) / 2), torch.round((length - crop) / 2))


def _to_original(
    top: Tensor, left: Tensor, new_h: Tensor, new_w: Tensor, height: Tensor, width: Tensor, crop: int
) -> Tensor:
    """Boxes (top, left, crop, crop) in resized pixels -> (top, left, height, width) in original pixels."""
    scale_y, scale_x = height / new_h, width / new_w
    return torch.stack([top * scale_y, left * scale_x, crop * scale_y, crop * scale_x], dim=1)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise UserError(f"{name} must be a positive integer, got {value!r}")
    return value


def _channel_stats(name: str, values: Sequence[float]) -> Tensor:
    stats = torch.as_tensor(list(values), dtype=torch.float32)
    if stats.dim() != 1 or len(stats) not in (1, 3):
        raise UserError(f"{name} must have 1 or 3 values (one per channel), got {list(values)}")
    return stats
