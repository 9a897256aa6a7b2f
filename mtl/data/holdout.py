"""A validation set carved from the training split (``data.val_split`` as a fraction), and the checks that keep the
test split held out: the checkpoint is selected on validation images, and the test split is only reported."""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.core.errors import UserError
from mtl.data.subset import LabelledSubset, dataset_labels

# data sets whose split "val" reads their test files (``resolve_split(..., {"val": "test"})``): selecting on "val"
# selects on the test images
VAL_READS_TEST = ("fashion_mnist", "mnist", "cifar10", "cifar100")


def stratified_split(labels: Tensor, fraction: float, seed: int, classes: Sequence[str] = ()) -> Tuple[Tensor, Tensor]:
    """(train indices, validation indices), both sorted: of each class's n items, round(fraction * n) (halves up)
    drawn at random with ``seed`` for validation, the rest kept for training: the holdout method, stratified so that
    validation keeps the class proportions (Kohavi 1995, "A study of cross-validation and bootstrap for accuracy
    estimation and model selection", IJCAI, Sec. 2).
    Classes are drawn in label order from one generator, so a seed gives the same split on any machine. A class
    left without a validation or a training item is refused, named by ``classes[label]`` when given."""
    generator = torch.Generator().manual_seed(seed)
    train, val, short = [], [], []
    for label in labels.unique().tolist():
        members = (labels == label).nonzero().flatten()
        n = len(members)
        k = math.floor(fraction * n + 0.5)
        if k == 0 or k == n:
            name = classes[label] if 0 <= label < len(classes) else str(label)
            short.append(f"{name!r} ({n} item{'s' if n != 1 else ''} -> {k} for validation)")
            continue
        order = members[torch.randperm(n, generator=generator)]
        val.append(order[:k])
        train.append(order[k:])
    if short:
        raise UserError(
            f"data.val_split={fraction:g} leaves class(es) without a validation or without a training item: "
            f"{', '.join(short[:5])}{', ...' if len(short) > 5 else ''}; choose a fraction that gives every "
            f"class both, or a val split by name"
        )
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def carve_validation(
    train: Dataset, eval_view: Dataset, fraction: float, seed: int
) -> Tuple[LabelledSubset, LabelledSubset]:
    """``train`` (training transforms) and ``eval_view`` (the same items with evaluation transforms) split into
    (training part of ``train``, validation part of ``eval_view``) by ``stratified_split``."""
    if isinstance(getattr(train, "targets", None), dict):
        raise UserError(
            f"data.val_split={fraction:g} carves validation from single-label data sets; this one has several "
            f"targets ({', '.join(train.targets)}) and splits of its own: set data.val_split to one of them, e.g. val"
        )
    if len(train) != len(eval_view):
        raise UserError(
            f"the training split gave {len(train)} items with training transforms but {len(eval_view)} with "
            f"evaluation transforms; data.val_split={fraction:g} needs the same items in both"
        )
    labels = dataset_labels(train)
    classes = list(getattr(train, "classes", None) or [])
    train_idx, val_idx = stratified_split(labels, fraction, seed, classes)
    names = classes or [str(c) for c in range(int(labels.max()) + 1)]
    return (
        LabelledSubset(train, train_idx.tolist(), labels[train_idx], names),
        LabelledSubset(eval_view, val_idx.tolist(), labels[val_idx], names),
    )


def same_items(a: Dataset, b: Dataset) -> bool:
    """Whether two splits (built with evaluation transforms) hold the same images: same length, and the same first
    and last image. A data set may read one split name for another (``resolve_split`` aliases)."""
    if len(a) != len(b):
        return False
    return all(torch.equal(a[i]["image"], b[i]["image"]) for i in dict.fromkeys((0, len(a) - 1)) if len(a))


def val_text(val_split: str | float, train_split: str, split_seed: int) -> str:
    """How the validation set was made, for summary.json's protocol: ``split val`` or
    ``10% of split train (class-stratified, data.split_seed 0)``."""
    if isinstance(val_split, float):
        return f"{val_split * 100:g}% of split {train_split} (class-stratified, data.split_seed {split_seed})"
    return f"split {val_split}"


def selects_on_test(dataset: str, val_split: str | float) -> bool:
    """Whether the validation split named ``val_split`` holds ``dataset``'s test images."""
    return val_split == "test" or (val_split == "val" and dataset in VAL_READS_TEST)
