"""Two classes from one logit (the cats-vs-dogs recipe)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.tasks.base import F64, Task, _div, check_smoothing, register


@register("binary")
@dataclass
class Binary(Task):
    """Two classes from a single logit with binary cross-entropy (the cats-vs-dogs recipe)."""

    label_smoothing: float = 0.0

    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "acc": True, "f1": True}
    primary: ClassVar[str] = "acc"
    fixed_outputs: ClassVar[Optional[int]] = 1
    confusion: ClassVar[bool] = True
    has_probabilities: ClassVar[bool] = True
    mixable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_smoothing(self.label_smoothing)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.float()
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(pred.float().squeeze(1), target)

    def soft_target(self, target: Tensor) -> Tensor:
        return target.float()

    def predict(self, pred: Tensor) -> Tensor:
        return (pred.squeeze(1) > 0).long()

    def state_size(self) -> int:
        return 5  # n, correct, tp, fp, fn

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        p, t = self.predict(pred).bool(), target.reshape(-1).bool()
        n = torch.full((), t.numel(), dtype=F64, device=pred.device)
        sums = torch.stack([(p == t).sum(), (p & t).sum(), (p & ~t).sum(), (~p & t).sum()]).to(F64)
        return state + torch.cat([n.reshape(1), sums])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, correct, tp, fp, fn = state.tolist()
        return {"acc": _div(correct, n), "f1": _div(2 * tp, 2 * tp + fp + fn)}

    @classmethod
    def accepts_num_classes(cls, n: int) -> bool:
        return n in (1, 2)  # one logit for two classes

    @classmethod
    def check_data_classes(cls, task: str, n: Optional[int]) -> None:
        if n is not None and n != 2:
            raise UserError(f"tasks.{task} is binary but the data has {n} classes; use type: classification")

    def probabilities(self, pred: Tensor) -> Tensor:
        p = torch.sigmoid(pred.float().squeeze(1))
        return torch.stack([1 - p, p], dim=1)

    def confusion_classes(self) -> int:
        return 2
