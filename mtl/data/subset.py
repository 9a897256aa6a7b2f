"""Class-balanced, seeded subsets of labelled data sets (few-shot / low-data experiments)."""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from mtl.core.errors import UserError


class LabelledSubset(Subset):
    """A ``Subset`` that keeps the parent's ``classes`` and the ``labels`` of its own items."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: Tensor, classes: list[str]) -> None:
        super().__init__(dataset, list(indices))
        self.labels = labels
        self.classes = classes


def dataset_labels(dataset: Dataset) -> Tensor:
    """All labels of a data set as a 1-D LongTensor, read from ``.labels``/``.targets`` when it has them."""
    for name in ("labels", "targets"):
        labels = getattr(dataset, name, None)
        if labels is not None:
            return torch.as_tensor(labels, dtype=torch.long).flatten()
    return torch.tensor([int(dataset[i]["label"]) for i in range(len(dataset))], dtype=torch.long)


def subset_per_class(dataset: Dataset, labels_per_class: int, seed: int) -> LabelledSubset:
    """``labels_per_class`` samples of every class, drawn with ``seed`` (same seed -> same indices)."""
    if labels_per_class < 1:
        raise UserError(f"labels_per_class must be at least 1, got {labels_per_class}")
    labels = dataset_labels(dataset)
    classes = list(getattr(dataset, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)])
    generator = torch.Generator().manual_seed(seed)
    picked, short = [], []
    for label, name in enumerate(classes):
        members = (labels == label).nonzero().flatten()
        if len(members) < labels_per_class:
            short.append(f"{name!r} has {len(members)}")
            continue
        picked.append(members[torch.randperm(len(members), generator=generator)[:labels_per_class]])
    if short:
        raise UserError(
            f"labels_per_class={labels_per_class} but {len(short)} class(es) have fewer samples "
            f"({'; '.join(short[:5])}{'; ...' if len(short) > 5 else ''}); lower labels_per_class"
        )
    indices = torch.cat(picked).sort().values
    return LabelledSubset(dataset, indices.tolist(), labels[indices], classes)


class ClassSubset(Dataset):
    """The items of some classes only, relabelled ``0..n-1`` in the order given (e.g. Split Fashion-MNIST's
    tasks). ``classes`` entries are class indices or names of the parent data set."""

    def __init__(self, dataset: Dataset, classes: Sequence[Union[int, str]]) -> None:
        if isinstance(getattr(dataset, "targets", None), dict):
            raise UserError("data.classes picks classes of single-label data sets; this one has several targets")
        names = list(getattr(dataset, "classes", None) or [])
        labels = dataset_labels(dataset)
        n = len(names) or int(labels.max()) + 1
        chosen = []
        for c in classes:
            if isinstance(c, str):
                if c not in names:
                    raise UserError(
                        f"data.classes: no class {c!r}; the data set has {', '.join(names[:20]) or 'no class names'}"
                    )
                c = names.index(c)
            if not 0 <= c < n:
                raise UserError(
                    f"data.classes: class index {c} is out of range; the data set has {n} classes (0..{n - 1})"
                )
            chosen.append(c)
        if len(set(chosen)) != len(chosen) or not chosen:
            raise UserError(f"data.classes must list distinct classes, got {list(classes)}")
        mapping = torch.full((n,), -1, dtype=torch.long)
        mapping[torch.tensor(chosen)] = torch.arange(len(chosen))
        keep = mapping[labels] >= 0
        self.dataset, self.indices = dataset, keep.nonzero().flatten().tolist()
        self.labels = mapping[labels[keep]]
        self.classes = [names[c] if names else str(c) for c in chosen]
        self.skipped = getattr(dataset, "skipped", [])

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = dict(self.dataset[self.indices[index]])
        item["label"] = self.labels[index]
        return item
