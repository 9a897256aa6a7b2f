"""Per-pixel classes: a confusion matrix gives mIoU and pixel accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Dict, Optional

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mtl.tasks.base import Task, _counts, _div, register
from mtl.tasks.drawing import class_legend, palette


@register("segmentation")
@dataclass
class Segmentation(Task):
    """Per-pixel classes: (B, C, H, W) logits vs (B, H, W) long targets, ``ignore_index`` pixels skipped.

    Metrics from a C x C confusion matrix: ``miou`` over classes present in the targets or predictions,
    ``pixel_acc``.
    """

    ignore_index: int = -1

    dense: ClassVar[bool] = True
    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "miou": True, "pixel_acc": True}
    primary: ClassVar[str] = "miou"
    has_probabilities: ClassVar[bool] = True

    def _valid(self, target: Tensor) -> Tensor:
        return (target != self.ignore_index) & (target >= 0) & (target < self.out_dim)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # by hand rather than F.cross_entropy: an all-ignored batch gives 0, not nan
        valid = self._valid(target)
        logp = pred.float().log_softmax(dim=1)
        nll = -logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def state_size(self) -> int:
        return self.out_dim**2  # confusion[target, prediction]

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        c = self.out_dim
        index = torch.where(self._valid(target), target * c + pred.argmax(dim=1), c * c)
        return state + _counts(index, c * c)

    def compute(self, state: Tensor) -> Dict[str, float]:
        cm = state.detach().cpu().view(self.out_dim, self.out_dim)
        hits = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - hits
        present = union > 0
        return {
            "miou": (hits[present] / union[present]).mean().item() if present.any() else 0.0,
            "pixel_acc": _div(hits.sum().item(), cm.sum().item()),
        }

    def probabilities(self, pred: Tensor) -> Tensor:
        return pred.float().softmax(dim=1)

    def draw(self, output: Tensor, image: Tensor) -> Tensor:
        """Palette colours of the predicted classes blended 50% over the image."""
        output = output.detach().float().cpu()
        if image.shape[-2:] != output.shape[-2:]:
            image = F.interpolate(image[None].float(), size=output.shape[-2:], mode="bilinear", align_corners=False)[0]
        colours = palette(output.shape[0])[output.argmax(0)].permute(2, 0, 1).float() / 255
        return 0.5 * image.detach().float().cpu().clamp(0, 1) + 0.5 * colours

    def draw_target(self, target: Tensor, image: Tensor) -> Tensor:
        """The true classes in the same colours, blended 50% over the image; ignored pixels show the image
        darkened."""
        target = target.detach().cpu().long()
        image = image.detach().float().cpu().clamp(0, 1)
        if image.shape[-2:] != target.shape[-2:]:
            image = F.interpolate(image[None], size=target.shape[-2:], mode="bilinear", align_corners=False)[0]
        valid = self._valid(target)
        colours = palette(self.out_dim)[torch.where(valid, target, 0)].permute(2, 0, 1).float() / 255
        return torch.where(valid, 0.5 * image + 0.5 * colours, 0.3 * image)

    def draw_key(self, outputs: Tensor, targets: Tensor) -> Optional[Image.Image]:
        """The colour of every class that the shown ground truth or predictions contain, with its name."""
        targets = targets.long()
        shown = torch.cat([targets[self._valid(targets)], outputs.argmax(1).reshape(-1)]).unique().tolist()
        names = [self.classes[c] if c < len(self.classes) else f"class {c}" for c in shown]
        return class_legend(names, palette(self.out_dim)[shown])
