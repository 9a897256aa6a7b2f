"""A warning when a classifier validates at chance while it learns its training images."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence, Tuple

from tqdm.auto import tqdm

from mtl.engine.trainer import Hook, Trainer
from mtl.tasks.classification import Classification

# validation accuracy within this share of the way from chance (1/K) to 1 counts as chance, e.g. <= 0.19 of 10 classes
VAL_MARGIN = 0.1
# training accuracy at least this share of the way from chance to 1 counts as learning, e.g. >= 0.37 of 10 classes
TRAIN_MARGIN = 0.3


def at_chance(tasks: Mapping[str, Any], history: Sequence[Mapping[str, Any]]) -> List[Tuple[str, float, float, int]]:
    """The classification tasks that validate at chance while they learn, at the last epoch of ``history``:
    ``(task, val acc, train acc, classes)`` of each task of K >= 2 classes (chance c = 1/K) whose validation accuracy
    is at most ``c + VAL_MARGIN * (1 - c)`` while its training accuracy is at least ``c + TRAIN_MARGIN * (1 - c)``
    and higher than in the first epoch (from the second epoch on; an epoch without validation counts as none)."""
    if len(history) < 2 or "val" not in history[-1]:
        return []
    first, last = history[0], history[-1]
    found = []
    for name, task in tasks.items():
        k = task.out_dim
        if not isinstance(task, Classification) or k < 2:
            continue
        val, train, start = (_acc(m, phase, name) for m, phase in ((last, "val"), (last, "train"), (first, "train")))
        if val is None or train is None or start is None:
            continue
        chance = 1.0 / k
        learns = train >= chance + TRAIN_MARGIN * (1 - chance) and train > start
        if learns and val <= chance + VAL_MARGIN * (1 - chance):
            found.append((name, val, train, k))
    return found


def _acc(metrics: Mapping[str, Any], phase: str, task: str) -> Any:
    return ((metrics.get(phase) or {}).get("tasks") or {}).get(task, {}).get("acc")


class ChanceWarningHook(Hook):
    """One warning line, once per run, the first epoch ``at_chance`` finds a task: what that usually means and what
    to set. A resumed run that had warned before does not warn again (read from the epoch history)."""

    def __init__(self) -> None:
        self.warned = False

    def on_resume(self, trainer: Trainer) -> None:
        self.warned = any(at_chance(trainer.tasks, trainer.history[:n]) for n in range(2, len(trainer.history) + 1))

    def after_epoch(self, trainer: Trainer, metrics: Dict[str, Any]) -> None:
        if self.warned:
            return
        found = at_chance(trainer.tasks, trainer.history)
        if found:
            self.warned = True
            tqdm.write(chance_warning(metrics["epoch"], found))


def chance_warning(epoch: int, found: Sequence[Tuple[str, float, float, int]]) -> str:
    """The warning line for the tasks ``at_chance`` found at ``epoch``."""
    shown = "; ".join(
        f"{name}: val acc {val:.3f}, chance 1/{k} = {1 / k:.3f}, train acc {train:.3f}" for name, val, train, k in found
    )
    return (
        f"warning: epoch {epoch}: validation accuracy at chance while training accuracy climbs ({shown}). Likely: "
        f"BatchNorm running statistics that lag the weights (few steps, or a small momentum such as 0.01 from a "
        f"TensorFlow port; set model.bn_momentum: 0.1 or train.bn_recompute: true), evaluation inputs unlike the "
        f"training ones (data.mean/std, image_size, resize_size), or too few training images to generalise from"
    )
