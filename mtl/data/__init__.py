"""Data sets (items are dicts of tensors), their registry, transforms and class-balanced subsets."""
from . import captcha_chars, cifar, folder, mnist, shapes  # noqa: F401  (importing registers the data sets)
from .registry import DATASETS
from .subset import subset_per_class
from .transforms import AUGMENTATIONS, IMAGENET_MEAN, IMAGENET_STD, build_transforms

__all__ = ["AUGMENTATIONS", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "build_transforms", "subset_per_class"]
