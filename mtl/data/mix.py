"""Mixup and CutMix of a training batch on the device (``data.mix``), with draws fixed by (seed, epoch, batch).

Mixup (Zhang et al., ICLR 2018, eq. 1): ``x = lam x_i + (1 - lam) x_j`` and ``y = lam y_i + (1 - lam) y_j`` with
``lam ~ Beta(alpha, alpha)``. CutMix (Yun et al., ICCV 2019, eq. 1-2): a box of about ``(1 - lam) H W`` pixels of
``x_j`` pasted into ``x_i``, its centre uniform over the image and its sides clipped to it; ``lam`` is then corrected
to the exact share of ``x_i`` left, ``1 - box area / (H W)``, for the targets too.

The semantics are timm's ``Mixup`` in its default ``mode='batch'`` (timm/data/mixup.py, the DeiT recipe): one draw per
batch; with probability ``prob`` the batch is mixed, by CutMix with probability ``switch_prob`` when both methods are
on; image i is paired with image ``B - 1 - i`` (the batch flipped; in an odd batch the middle image keeps itself); the
box follows timm's ``rand_bbox`` (sides ``int(H sqrt(1 - lam))``, ``int(W sqrt(1 - lam))``, centre uniform, clipped).
Mixing normalised images equals normalising mixed ones, since normalisation is affine per channel.

Draws come from a NumPy generator seeded by (train.seed, epoch, batch index in the epoch) only: every process under
torchrun draws the same ``lam`` and box for its own share of the global batch, and a resumed run draws what the
uninterrupted one did, whatever else used the global random state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import numpy as np
from torch import Tensor

from mtl.tasks.base import Task

_STREAM = 0x6D6978  # "mix": keeps these draws apart from any other generator seeded by (seed, epoch, step)


@dataclass(frozen=True)
class MixDraw:
    """One batch's mixing: ``lam`` (the weight of each image itself; 1: not mixed) and, for CutMix, the ``box``
    (top, bottom, left, right; rows ``top:bottom`` and columns ``left:right`` come from the partner image)."""

    lam: float
    box: Optional[Tuple[int, int, int, int]] = None


def cutmix_box(lam: float, height: int, width: int, cy: int, cx: int) -> Tuple[int, int, int, int]:
    """The CutMix box for ``lam`` around the centre (cy, cx): sides ``int(H sqrt(1 - lam))`` and ``int(W sqrt(1 -
    lam))``, half of each (rounded down) to either side of the centre, clipped to the image (timm's ``rand_bbox``)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    top, bottom = min(max(cy - cut_h // 2, 0), height), min(max(cy + cut_h // 2, 0), height)
    left, right = min(max(cx - cut_w // 2, 0), width), min(max(cx + cut_w // 2, 0), width)
    return top, bottom, left, right


def mix_images(x: Tensor, draw: MixDraw) -> Tensor:
    """The batch ``x`` (B, C, H, W) mixed with itself flipped along the batch, as ``draw`` says (a new tensor)."""
    if draw.lam == 1.0:
        return x
    partner = x.flip(0)
    if draw.box is None:
        return x * draw.lam + partner * (1.0 - draw.lam)
    top, bottom, left, right = draw.box
    out = x.clone()
    out[..., top:bottom, left:right] = partner[..., top:bottom, left:right]
    return out


def mix_targets(soft: Tensor, lam: float) -> Tensor:
    """``lam * soft + (1 - lam) * soft`` flipped along the batch: the targets of the mixed images."""
    return soft * lam + soft.flip(0) * (1.0 - lam)


class BatchMix:
    """``data.mix``: Mixup and/or CutMix of each training batch, with timm's ``Mixup`` semantics (see the module).

    ``mixup_alpha`` / ``cutmix_alpha``: the Beta parameters, 0 turns that method off; ``prob``: the chance that a batch
    is mixed; ``switch_prob``: the chance of CutMix when both are on; ``seed``: train.seed.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        seed: int = 0,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0 or not (mixup_alpha > 0 or cutmix_alpha > 0):
            raise ValueError(f"mixup_alpha, cutmix_alpha must be >= 0, one > 0; got {mixup_alpha}, {cutmix_alpha}")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1):
            raise ValueError(f"prob and switch_prob must be in [0, 1], got {prob}, {switch_prob}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.prob, self.switch_prob, self.seed = float(prob), float(switch_prob), int(seed)

    def __repr__(self) -> str:
        return (
            f"BatchMix(mixup_alpha={self.mixup_alpha:g}, cutmix_alpha={self.cutmix_alpha:g}, prob={self.prob:g}, "
            f"switch_prob={self.switch_prob:g})"
        )

    def draw(self, epoch: int, position: int, height: int, width: int) -> MixDraw:
        """The mixing of batch ``position`` (0-based, in the epoch) of epoch ``epoch`` for images of ``height`` x
        ``width``, in timm's order of draws (``Mixup._params_per_batch``, then ``rand_bbox``)."""
        rng = np.random.default_rng([_STREAM, self.seed, epoch, position])
        if rng.random() >= self.prob:
            return MixDraw(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.random() < self.switch_prob)
        else:
            cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if cutmix else self.mixup_alpha
        lam = float(rng.beta(alpha, alpha))
        if not cutmix:
            return MixDraw(lam)
        cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
        top, bottom, left, right = cutmix_box(lam, height, width, cy, cx)
        return MixDraw(1.0 - (bottom - top) * (right - left) / float(height * width), (top, bottom, left, right))

    def __call__(
        self, x: Tensor, targets: Mapping[str, Tensor], tasks: Mapping[str, Task], epoch: int, position: int
    ) -> Tuple[Tensor, Dict[str, Tensor], Dict[str, Tensor]]:
        """``(images, targets, shown)``: the batch mixed; every task's targets mixed with the same ``lam`` and pairs
        (``Task.soft_target``; each task's label smoothing applies in its loss, which commutes with mixing); and the
        targets the training metrics count, each image's larger-weight label (its own when ``lam >= 0.5``)."""
        draw = self.draw(epoch, position, x.shape[-2], x.shape[-1])
        if draw.lam == 1.0:
            return x, dict(targets), dict(targets)
        mixed = {t: mix_targets(tasks[t].soft_target(y), draw.lam) for t, y in targets.items()}
        shown = dict(targets) if draw.lam >= 0.5 else {t: y.flip(0) for t, y in targets.items()}
        return mix_images(x, draw), mixed, shown


def batch_mix(mix: Optional[object], seed: int) -> Optional[BatchMix]:
    """The ``BatchMix`` of a ``data.mix`` config block (None: no mixing)."""
    if mix is None:
        return None
    fields = ("mixup_alpha", "cutmix_alpha", "prob", "switch_prob")
    return BatchMix(**{k: getattr(mix, k) for k in fields}, seed=seed)
