"""Surface normals per pixel: 1 - cosine, angular-error histogram."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mtl.tasks.base import F64, Task, _counts, _div, nearest, register
from mtl.tasks.drawing import text_key


@register("normals")
@dataclass
class Normals(Task):
    """Surface normals (B, 3, H, W); all-zero target = invalid pixel. Loss 1 - cosine similarity.

    Angular errors go into a histogram of 0.25 degree bins: the ``within_*`` fractions are exact and
    ``median_angle`` is within a bin; ``mean_angle`` is an exact sum.
    """

    dense: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {
        "loss": False,
        "mean_angle": False,
        "median_angle": False,
        "within_11.25": True,
        "within_22.5": True,
        "within_30": True,
    }
    primary: ClassVar[str] = "mean_angle"
    bin_deg: ClassVar[float] = 0.25
    thresholds: ClassVar[tuple] = (11.25, 22.5, 30.0)
    fixed_outputs: ClassVar[Optional[int]] = 3

    @property
    def bins(self) -> int:
        return round(180 / self.bin_deg)

    def _cosine(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target.abs().sum(dim=1) != 0
        cos = (self.predict(pred) * F.normalize(target.float(), dim=1)).sum(dim=1)
        return cos, valid

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        cos, valid = self._cosine(pred, target)
        return ((1 - cos) * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return F.normalize(pred.float(), dim=1)

    def state_size(self) -> int:
        return 2 + self.bins  # valid pixels, sum of angles, histogram

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        cos, valid = self._cosine(pred, target)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
        index = torch.where(valid, (angle / self.bin_deg).long().clamp(0, self.bins - 1), self.bins)
        head = torch.stack([valid.sum().to(F64), (angle * valid).sum(dtype=F64)])
        return state + torch.cat([head, _counts(index, self.bins)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        state = state.detach().cpu()
        n, angle_sum = state[:2].tolist()
        hist = state[2:]
        cum = hist.cumsum(0)
        out = {"mean_angle": _div(angle_sum, n), "median_angle": 0.0}
        if n > 0:
            i = int(torch.searchsorted(cum, torch.tensor([n / 2], dtype=F64)).item())
            before = cum[i - 1].item() if i > 0 else 0.0
            out["median_angle"] = (i + (n / 2 - before) / max(hist[i].item(), 1)) * self.bin_deg
        for t in self.thresholds:
            out[f"within_{t:g}"] = _div(cum[round(t / self.bin_deg) - 1].item(), n)
        return out

    def draw(self, output: Tensor, image: Tensor) -> Tensor:
        """The predicted unit normals as RGB: (n + 1) / 2."""
        predicted = self.predict(output.detach().float().cpu()[None])[0]
        return ((predicted + 1) / 2).clamp(0, 1)

    def draw_target(self, target: Tensor, image: Tensor) -> Tensor:
        """The true unit normals in the same colours; invalid (all-zero) pixels black."""
        target = target.detach().float().cpu()
        valid = target.abs().sum(0, keepdim=True) != 0
        return ((unit_vectors(target, dim=0) + 1) / 2).clamp(0, 1) * valid

    def draw_key(self, outputs: Tensor, targets: Tensor) -> Optional[Image.Image]:
        """How the colours read: (n + 1) / 2 as red, green, blue."""
        return text_key(["colour = (n + 1) / 2:", "red x, green y, blue z", "black: no ground truth"])

    @classmethod
    def flip_target(cls, target: Tensor) -> Tensor:
        """Mirrored, with the normals' x component negated."""
        sign = torch.tensor([-1.0, 1.0, 1.0], dtype=target.dtype, device=target.device)
        return target.flip(-1) * sign.view(3, 1, 1)

    @classmethod
    def resize_target(cls, target: Tensor, size: Tuple[int, int]) -> Tensor:
        """Bilinear (antialiased) and renormalised; invalid (all-zero) pixels stay invalid (nearest)."""
        size = (int(size[0]), int(size[1]))
        if tuple(target.shape[-2:]) == size:
            return target
        valid = nearest((target.abs().sum(0, keepdim=True) > 0).float(), size)
        smooth = F.interpolate(target[None].float(), size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        return unit_vectors(smooth, dim=0) * valid


def unit_vectors(x: Tensor, dim: int) -> Tensor:
    """``F.normalize(x, dim=dim)`` (zero vectors stay zero), written out: torch's norm kernel is about 10x slower
    on the CPU when reducing over a strided dimension such as the channels of a normal map."""
    return x / (x * x).sum(dim, keepdim=True).sqrt().clamp_min(1e-12)
