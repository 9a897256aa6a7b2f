"""A hook into the training step itself, for methods that change the update rather than watch it.

The continual learners (EWC, SI, LwF, replay, A-GEM) add a loss term, replay stored samples, project gradients or
track parameter paths. The trainer calls an extension, on the loss-level path of a training step, in this order:

1. ``extra_loss(model, x, targets, outputs)``: a term added to the weighted task loss before the backward pass
   (``None``: nothing to add);
2. ``before_update(model)``: after the backward pass (and the all-reduce under torchrun), before gradient
   clipping and the optimizer step; may change the gradients in place;
3. ``after_update(model, x, targets, outputs)``: after the optimizer step of a step that was taken (a skipped,
   non-finite step never gets here).

Its ``state_dict`` is saved in the trainer's checkpoints (``last.pt``), so a run killed in the middle resumes
exactly. Random draws use the extension's own generator, kept in that state.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
from torch import Tensor, nn


class StepExtension:
    """Base class: every call does nothing; subclasses override what they need. An extension that draws at random
    sets ``generator`` (a CPU ``torch.Generator``): a step skipped for a non-finite loss puts its state back."""

    generator: Optional[torch.Generator] = None

    def extra_loss(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> Optional[Tensor]:
        return None

    def before_update(self, model: nn.Module) -> None: ...

    def after_update(
        self, model: nn.Module, x: Tensor, targets: Mapping[str, Tensor], outputs: Mapping[str, Tensor]
    ) -> None: ...

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...
