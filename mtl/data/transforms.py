"""Image transforms: the ImageNet-style train/eval pipelines of the PyTorch transfer-learning tutorial."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
from torchvision.transforms import v2

from mtl.core.errors import UserError
from mtl.data.batch_autoaugment import policy_options

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
AUGMENTATIONS = ("random_resized_crop", "random_crop", "none")


def build_transforms(
    *,
    train: bool,
    image_size: int = 224,
    resize_size: int = 256,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    augment: bool | str = True,
    crop_padding: int = 0,
    flip: bool = True,
    auto_augment: Optional[str] = None,
    auto_augment_options: Optional[Mapping[str, Any]] = None,
    random_erasing: float = 0.0,
) -> v2.Compose:
    """PIL image or uint8 tensor (1 or 3 channels) -> normalised float tensor (3, image_size, image_size).

    Train-time ``augment``: ``random_resized_crop`` (or True) = RandomResizedCrop + flip; ``random_crop`` =
    Resize(resize_size) + RandomCrop(image_size, padding=crop_padding) + flip; ``none`` (or False) and eval =
    Resize(resize_size) + CenterCrop(image_size). ``flip`` False: the flip never mirrors (it still draws its
    number, so the crops and later draws are those of a run with flips). Train only, in the order of torchvision's
    reference ClassificationPresetTrain: ``auto_augment`` (trivial | randaugment | augmix: torchvision's
    TrivialAugmentWide, RandAugment, AugMix with ``auto_augment_options``) on the uint8 crop, then normalisation, then
    RandomErasing with probability ``random_erasing`` (value 0).
    """
    mode = _augmentation(augment) if train else "none"
    if mode == "random_resized_crop":
        geometry = [v2.RandomResizedCrop(image_size, antialias=True), _flip(flip)]
    elif mode == "random_crop":
        geometry = [
            v2.Resize(resize_size, antialias=True),
            v2.RandomCrop(image_size, padding=crop_padding or None, pad_if_needed=True),
            _flip(flip),
        ]
    else:
        geometry = eval_geometry(image_size, resize_size)
    policy = _auto_augment(auto_augment, auto_augment_options) if train and auto_augment else []
    erasing = [v2.RandomErasing(p=random_erasing, value=0)] if train and random_erasing else []
    if policy:  # on 3-channel uint8, as the batched pipeline (grey images replicated first)
        return v2.Compose(
            [
                v2.ToImage(),
                *geometry,
                v2.RGB(),
                *policy,
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(mean=list(mean), std=list(std)),
                *erasing,
            ]
        )
    return v2.Compose(
        [v2.ToImage(), *geometry, *_to_float_rgb(), v2.Normalize(mean=list(mean), std=list(std)), *erasing]
    )


def eval_geometry(image_size: int, resize_size: int) -> list[v2.Transform]:
    """The evaluation geometry: Resize(resize_size) (shorter side, antialiased) + CenterCrop(image_size)."""
    return [v2.Resize(resize_size, antialias=True), v2.CenterCrop(image_size)]


def eval_view(image_size: int, resize_size: int) -> v2.Compose:
    """PIL image or uint8 tensor (..., C, H, W) -> the uint8 pixels the eval transform normalises: ``build_transforms(
    train=False)`` up to its geometry. Leading batch dimensions are transformed image by image."""
    return v2.Compose([v2.ToImage(), *eval_geometry(image_size, resize_size)])


def default_transform() -> v2.Compose:
    """The transform of a data set given none: a 3-channel float tensor in [0, 1], size unchanged."""
    return v2.Compose([v2.ToImage(), *_to_float_rgb()])


def _auto_augment(policy: str, options: Optional[Mapping[str, Any]]) -> list[v2.Transform]:
    """torchvision's transform of ``policy`` with its defaults (``AUTO_AUGMENT_OPTIONS``) and ``options``."""
    o = policy_options(policy, options)
    if policy == "trivial":
        return [v2.TrivialAugmentWide(num_magnitude_bins=o["num_magnitude_bins"])]
    if policy == "randaugment":
        return [v2.RandAugment(o["num_ops"], o["magnitude"], o["num_magnitude_bins"])]
    return [
        v2.AugMix(
            severity=o["severity"],
            mixture_width=o["mixture_width"],
            chain_depth=o["chain_depth"],
            alpha=float(o["alpha"]),
            all_ops=o["all_ops"],
        )
    ]


def _flip(on: bool) -> v2.RandomHorizontalFlip:
    # p=0 draws torch.rand(1) like p=0.5 and never mirrors: the random stream stays that of a run with flips
    return v2.RandomHorizontalFlip(p=0.5 if on else 0.0)


def _augmentation(augment: bool | str) -> str:
    if isinstance(augment, bool):
        return AUGMENTATIONS[0] if augment else "none"
    if augment not in AUGMENTATIONS:
        raise UserError(f"unknown augmentation {augment!r}; use one of: {', '.join(AUGMENTATIONS)}")
    return augment


def _to_float_rgb() -> list[v2.Transform]:
    # After the geometry: replicating a grey channel is cheaper on the cropped image.
    return [v2.RGB(), v2.ToDtype(torch.float32, scale=True)]
