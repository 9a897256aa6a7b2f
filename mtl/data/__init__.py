"""Data sets (items are dicts of tensors), their registry, transforms and class-balanced subsets."""

from mtl.data import (  # noqa: F401,E501  (registers them)
    captcha_chars,
    captcha_text,
    celeba,
    cifar,
    folder,
    mnist,
    multi_fashion,
    npy_dense,
    scenes,
    shapes,
)
from mtl.data.registry import DATASETS
from mtl.data.subset import ClassSubset, subset_per_class
from mtl.data.transforms import (
    AUGMENTATIONS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    build_transforms,
)

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ClassSubset",
    "build_transforms",
    "subset_per_class",
]
