"""Task types: what a head outputs, its loss, and how predictions are scored."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn.functional as F
from torch import Tensor

from .registry import Registry

TASK_TYPES = Registry("task type")


@dataclass
class Task:
    """One task of a model: ``loss(pred, target)``, ``predict(pred)`` and ``correct(pred, target)``."""

    name: str
    target: str
    out_dim: int
    weight: float = 1.0
    classes: List[str] = field(default_factory=list)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, pred: Tensor) -> Tensor:
        raise NotImplementedError

    def correct(self, pred: Tensor, target: Tensor) -> Tensor:
        """Number of correct predictions in the batch, as a tensor (no host sync)."""
        return (self.predict(pred) == target).sum()


@TASK_TYPES.register("classification")
@dataclass
class Classification(Task):
    """Softmax over ``num_classes`` logits with cross-entropy."""

    label_smoothing: float = 0.0

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(pred.float(), target, label_smoothing=self.label_smoothing)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)


@TASK_TYPES.register("binary")
@dataclass
class Binary(Task):
    """Two classes from a single logit with binary cross-entropy (the cats-vs-dogs recipe)."""

    label_smoothing: float = 0.0

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.float()
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(pred.float().squeeze(1), target)

    def predict(self, pred: Tensor) -> Tensor:
        return (pred.squeeze(1) > 0).long()


def build_task(name: str, *, type: str, target: str, num_classes: int, weight: float = 1.0,
               classes: List[str] | None = None, label_smoothing: float = 0.0) -> Task:
    """Build a task of a registered type; binary tasks get one output, others ``num_classes``."""
    cls = TASK_TYPES.get(type)
    out_dim = 1 if cls is Binary else num_classes
    return cls(name=name, target=target, out_dim=out_dim, weight=weight, classes=list(classes or []),
               label_smoothing=label_smoothing)


def probabilities(task: Task, pred: Tensor) -> Tensor:
    """Class probabilities (B, C) for either task type."""
    if isinstance(task, Binary):
        p = torch.sigmoid(pred.float().squeeze(1))
        return torch.stack([1 - p, p], dim=1)
    return pred.float().softmax(dim=1)
