"""Per-pixel depth: L1 on valid pixels, absolute and relative errors."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Dict, Mapping, Optional

import torch
from torch import Tensor

from mtl.tasks.base import F64, Task, _div, register
from mtl.tasks.drawing import card, colormap_between, colour_bar


@register("depth")
@dataclass
class Depth(Task):
    """Per-pixel depth (B, 1, H, W); target 0 = invalid pixel. L1 loss, ``abs_err`` and ``rel_err`` on valid pixels."""

    dense: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "abs_err": False, "rel_err": False}
    primary: ClassVar[str] = "abs_err"
    fixed_outputs: ClassVar[Optional[int]] = 1

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        valid = target != 0
        return ((pred.float() - target.float()).abs() * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.float()

    def state_size(self) -> int:
        return 3  # valid pixels, sum |err|, sum |err| / target

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        valid = target != 0
        err = (pred.float() - target.float()).abs() * valid
        rel = err / torch.where(valid, target.float().abs(), 1.0)
        return state + torch.stack([valid.sum().to(F64), err.sum(dtype=F64), rel.sum(dtype=F64)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, abs_sum, rel_sum = state.tolist()
        return {"abs_err": _div(abs_sum, n), "rel_err": _div(rel_sum, n)}

    def overlay(self, outputs: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        """As ``Task.overlay``, with ground truth and prediction on one colour scale, the range of the shown valid
        ground truth (predictions beyond it take the end colours), and its colour bar; pixels without ground truth
        are black."""
        outputs, targets = outputs.detach().float().cpu(), self.targets_like(targets, outputs).float()
        valid = targets != 0
        known = targets[valid] if bool(valid.any()) else outputs.reshape(-1)
        lo, hi = float(known.min()), float(known.max())
        rows = [
            [images[i], colormap_between(targets[i, 0], lo, hi) * valid[i], colormap_between(outputs[i, 0], lo, hi)]
            for i in range(len(outputs))
        ]
        return card(rows, key=colour_bar(lo, hi, label="depth"))

    @classmethod
    def zoom_target(cls, target: Tensor, scale: float, spec: Mapping[str, Any]) -> Tensor:
        """Depth shrinks by ``scale`` as the camera comes closer; inverse depth (``spec["inverse"]``, disparity)
        grows by it."""
        return target * scale if spec.get("inverse") else target / scale
