"""Real-valued outputs per image: mse, l1 or smooth-l1."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar, Dict

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.tasks.base import F64, Task, _div, register


@register("regression")
@dataclass
class Regression(Task):
    """``out_dim`` real outputs (float targets); ``loss`` is mse, l1 or smooth_l1; reports ``mae`` and ``rmse``."""

    loss_fn: str = "mse"

    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "mae": False, "rmse": False}
    primary: ClassVar[str] = "mae"
    outputs_key: ClassVar[str] = "num_outputs"
    option_fields: ClassVar[Dict[str, str]] = {"loss": "loss_fn"}  # a field "loss" would shadow the method
    losses: ClassVar[Dict[str, Callable[..., Tensor]]] = {
        "mse": F.mse_loss,
        "l1": F.l1_loss,
        "smooth_l1": F.smooth_l1_loss,
    }

    def __post_init__(self) -> None:
        if self.loss_fn not in self.losses:
            raise UserError(f"unknown regression loss {self.loss_fn!r}; use one of {', '.join(self.losses)}")

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.losses[self.loss_fn](pred.float(), target.reshape(pred.shape).float())

    def predict(self, pred: Tensor) -> Tensor:
        return pred.float()

    def state_size(self) -> int:
        return 3  # n, sum |err|, sum err^2

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        err = pred.to(F64) - target.reshape(pred.shape).to(F64)
        n = torch.full((), err.numel(), dtype=F64, device=pred.device)
        return state + torch.stack([n, err.abs().sum(), err.square().sum()])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, abs_sum, sq_sum = state.tolist()
        return {"mae": _div(abs_sum, n), "rmse": math.sqrt(_div(sq_sum, n))}
