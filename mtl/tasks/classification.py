"""Image-level classification: softmax over the classes, cross-entropy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.tasks.base import F64, Task, _div, check_smoothing, register


@register("classification")
@dataclass
class Classification(Task):
    """Softmax over ``out_dim`` logits with cross-entropy; reports ``acc`` and ``top{topk}`` (when out_dim > topk)."""

    label_smoothing: float = 0.0
    topk: int = 5

    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "acc": True}
    primary: ClassVar[str] = "acc"
    confusion: ClassVar[bool] = True
    has_probabilities: ClassVar[bool] = True
    mixable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_smoothing(self.label_smoothing)
        if not isinstance(self.topk, int) or self.topk < 1:
            raise UserError(f"topk must be a positive integer, got {self.topk!r}")
        if self.has_topk:  # the instance reports one more metric than the class default
            self.metric_directions = {**type(self).metric_directions, f"top{self.topk}": True}

    @property
    def has_topk(self) -> bool:
        return self.out_dim > self.topk

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        """Cross-entropy against class indices (B,) or class probabilities (B, out_dim) (``data.mix``); label
        smoothing mixes either with the uniform distribution, ``(1 - s) y + s / K``."""
        return F.cross_entropy(pred.float(), target, label_smoothing=self.label_smoothing)

    def soft_target(self, target: Tensor) -> Tensor:
        return F.one_hot(target.long(), self.out_dim).float()

    def predict(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def state_size(self) -> int:
        return 3  # n, correct, top-k correct

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        n = torch.full((), target.numel(), dtype=F64, device=pred.device)
        correct = (pred.argmax(dim=1) == target).sum()
        if self.has_topk:
            top = (pred.topk(self.topk, dim=1).indices == target.unsqueeze(1)).any(dim=1).sum()
        else:
            top = correct
        return state + torch.stack([n, correct.to(F64), top.to(F64)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, correct, top = state.tolist()
        out = {"acc": _div(correct, n)}
        if self.has_topk:
            out[f"top{self.topk}"] = _div(top, n)
        return out

    def probabilities(self, pred: Tensor) -> Tensor:
        return pred.float().softmax(dim=1)
