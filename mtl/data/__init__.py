"""Data sets (items are dicts of tensors), their registry, transforms and class-balanced subsets."""
from . import captcha_chars, captcha_text, celeba, cifar, folder, mnist, multi_fashion, npy_dense, scenes, shapes  # noqa: F401,E501  (registers them)
from .registry import DATASETS
from .subset import ClassSubset, subset_per_class
from .transforms import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = ["AUGMENTATIONS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "ClassSubset", "build_transforms", "subset_per_class"]
