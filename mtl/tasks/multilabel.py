"""Independent labels per image: sigmoid per label, binary cross-entropy, mean AP."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.tasks.base import F64, Task, _counts, _div, register


@register("multilabel")
@dataclass
class Multilabel(Task):
    """``out_dim`` independent labels (float 0/1 targets), BCE with logits.

    ``map`` (mean average precision over labels with positives) comes from per-label histograms of the
    scores of positives and negatives, so it is a fixed-size sum like the rest. The ``ap_bins`` bins are
    even in asinh(logit) over logits -30..30 (a monotone map of the sigmoid score): narrow near the decision
    boundary, still resolving confident scores that saturate the sigmoid.
    ``f1_macro`` averages over labels that occur in the targets or the predictions.
    """

    pos_weight: Optional[List[float]] = None

    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {
        "loss": False,
        "acc": True,
        "f1_micro": True,
        "f1_macro": True,
        "map": True,
    }
    primary: ClassVar[str] = "map"
    has_probabilities: ClassVar[bool] = True
    mixable: ClassVar[bool] = True
    ap_bins: ClassVar[int] = 400
    ap_logit_range: ClassVar[float] = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.pos_weight, (int, float)):
            self.pos_weight = [float(self.pos_weight)] * self.out_dim
        if self.pos_weight is not None:
            if len(self.pos_weight) != self.out_dim:
                raise UserError(f"pos_weight has {len(self.pos_weight)} values but the task has {self.out_dim} labels")
            self.pos_weight = [float(w) for w in self.pos_weight]
        self._pos_weight: Dict[torch.device, Tensor] = {}

    def _weights(self, device: torch.device) -> Optional[Tensor]:
        if self.pos_weight is None:
            return None
        if device not in self._pos_weight:  # one copy per device, not one per step
            self._pos_weight[device] = torch.tensor(self.pos_weight, device=device)
        return self._pos_weight[device]

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(pred.float(), target.float(), pos_weight=self._weights(pred.device))

    def soft_target(self, target: Tensor) -> Tensor:
        return target.float()

    def predict(self, pred: Tensor) -> Tensor:
        return (pred > 0).long()

    def state_size(self) -> int:
        return 2 + 3 * self.out_dim + 2 * self.out_dim * self.ap_bins  # n, correct, tp/fp/fn[K], hist[K, 2, bins]

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        k, bins = self.out_dim, self.ap_bins
        p, t = pred > 0, target > 0.5
        n = torch.full((), t.numel(), dtype=F64, device=pred.device)
        head = torch.stack([n, (p == t).sum().to(F64)])
        confusion = torch.cat([(p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)]).to(F64)
        half = math.asinh(self.ap_logit_range)
        score_bin = ((torch.asinh(pred.float()) + half) * (bins / (2 * half))).long().clamp(0, bins - 1)
        label = torch.arange(k, device=pred.device)
        hist = _counts((label * 2 + t.long()) * bins + score_bin, 2 * k * bins)
        return state + torch.cat([head, confusion, hist])

    def compute(self, state: Tensor) -> Dict[str, float]:
        k, bins = self.out_dim, self.ap_bins
        state = state.detach().cpu()
        n, correct = state[:2].tolist()
        tp, fp, fn = state[2 : 2 + 3 * k].view(3, k)
        hist = state[2 + 3 * k :].view(k, 2, bins).flip(-1)  # highest scores first
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        occurs = (tp + fp + fn) > 0
        return {
            "acc": _div(correct, n),
            "f1_micro": _div(2 * tp.sum().item(), (2 * tp + fp + fn).sum().item()),
            "f1_macro": f1[occurs].mean().item() if occurs.any() else 0.0,
            "map": _mean_ap(hist[:, 1], hist[:, 0]),
        }

    def probabilities(self, pred: Tensor) -> Tensor:
        return torch.sigmoid(pred.float())


def _mean_ap(pos: Tensor, neg: Tensor) -> float:
    """Mean over labels with positives of the AP from score histograms (K, bins), highest bin first.

    Within a bin, positives and negatives are taken as evenly interleaved: the j-th positive of p in a bin
    with n negatives has about j*n/(p+1) of them ahead of it. The average precision over a bin's
    positives is evaluated at a few points of j.
    """
    pos_before = pos.cumsum(-1) - pos
    neg_before = neg.cumsum(-1) - neg
    j = 1 + (pos - 1).clamp(min=0).unsqueeze(-1) * (torch.arange(8, dtype=F64) + 0.5) / 8  # (K, bins, 8)
    ahead = j * (neg / (pos + 1)).unsqueeze(-1)
    precision = (pos_before.unsqueeze(-1) + j) / (pos_before + neg_before).unsqueeze(-1).add(j + ahead)
    total = pos.sum(-1)
    ap = (pos * precision.mean(-1)).sum(-1) / total.clamp(min=1)
    has_pos = total > 0
    return ap[has_pos].mean().item() if has_pos.any() else 0.0
