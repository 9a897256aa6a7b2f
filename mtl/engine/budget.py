"""How long a run trains: ``train.epochs`` whole epochs, or ``train.steps`` training steps (the last epoch cut)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional

from mtl.config.schema import TrainCfg
from mtl.engine.trainer import updates_per_epoch


@dataclass(frozen=True)
class Budget:
    """``epochs`` passes over the training data of ``per_epoch`` training steps each (one optimizer update a step);
    with a step budget (``steps``) the last pass ends once ``steps`` steps are made in all."""

    epochs: int
    per_epoch: int
    steps: Optional[int] = None  # train.steps; None: whole epochs

    @property
    def total(self) -> int:
        """The training steps of the whole run."""
        return self.steps if self.steps is not None else self.epochs * self.per_epoch

    @property
    def last_epoch_steps(self) -> int:
        return self.total - (self.epochs - 1) * self.per_epoch

    def text(self) -> str:
        """``1000 steps = 143 epochs of 7 steps (the last 6; train.epochs not used)``, or ``25 epochs of 7 steps``."""
        plural = "s" if self.epochs > 1 else ""
        if self.steps is None:
            return f"{self.epochs} epoch{plural} of {self.per_epoch} steps"
        notes = [f"the last {self.last_epoch_steps}"] if self.last_epoch_steps < self.per_epoch else []
        notes.append("train.epochs not used")
        return f"{self.steps} steps = {self.epochs} epoch{plural} of {self.per_epoch} steps ({'; '.join(notes)})"

    def as_dict(self) -> Dict[str, Any]:
        """For summary.json: the unit the run was given (steps or epochs) and both of its lengths."""
        return {
            "unit": "steps" if self.steps is not None else "epochs",
            "epochs": self.epochs,
            "steps": self.total,
            "steps_per_epoch": self.per_epoch,
        }


def run_budget(train: TrainCfg, batches: int, samples: int = 1) -> Budget:
    """The budget of a run of ``train`` whose training data gives ``batches`` batches an epoch (``samples``: batches a
    step of a multi-batch weighting): ``train.steps`` training steps in ceil(steps / steps an epoch) epochs, or
    ``train.epochs`` whole epochs."""
    per_epoch = updates_per_epoch(batches, samples, train.accumulate)
    if train.steps is None:
        return Budget(train.epochs, per_epoch)
    return Budget(-(-train.steps // max(per_epoch, 1)), per_epoch, train.steps)
