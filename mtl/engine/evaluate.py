"""``evaluate``: one pass over a loader in eval mode, giving every task's metrics and the confusion matrices.

Shared by ``mtl eval`` (``mtl.workflows.evaluate``) and the trainer's validation phase, which keeps the confusion
matrices of the pass that selects the best epoch for the TensorBoard hook to draw at the end of training.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    ContextManager,
    Dict,
    Iterable,
    List,
    Mapping,
    Optional,
)

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtl.core import distributed as dist
from mtl.core.runtime import evaluating
from mtl.data.multi_input import MultiInputLoader
from mtl.engine.meter import Meter, overall
from mtl.tasks.base import Task


@dataclass
class Evaluation:
    """What one pass over a split gives: per-task metrics (with ``loss``) and confusion matrices (rows true)."""

    size: int = 0
    metrics: Dict[str, Dict[str, float]] = field(default_factory=dict)
    confusion: Dict[str, Tensor] = field(default_factory=dict)
    overall: Dict[str, float] = field(default_factory=dict)  # loss (static-weighted sum), acc (mean) as in training


def confusion_tasks(tasks: Mapping[str, Task]) -> List[str]:
    """The tasks whose type gets a confusion matrix (``Task.confusion``: image-level class predictions)."""
    return [t for t, task in tasks.items() if task.confusion]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Mapping[str, Any]],
    tasks: Mapping[str, Task],
    device: torch.device,
    *,
    autocast: Optional[Callable[[], ContextManager[Any]]] = None,
    channels_last: bool = False,
    metrics: bool = True,
    confusion: bool = True,
    reduce: bool = False,
    progress: Optional[bool] = False,
    desc: str = "eval",
) -> Evaluation:
    """One pass over ``loader`` (batches ``{"image", "targets": {task: y}}``) with ``model`` in eval mode: the one
    evaluation loop, used by the trainer's validation phase, ``mtl eval``, the TensorBoard hook and continual runs.

    With ``confusion``, confusion matrices for ``confusion_tasks``; with ``metrics``, every task's loss and metrics
    through the task metric API (``init_state``/``update``/``compute``), summed by a ``Meter``; with ``reduce``
    those sums and the confusion counts are added up over torchrun's processes (each saw its share of the split).
    ``progress``: a bar (None: only on a terminal). The model's train/eval mode is restored afterwards
    (``core.runtime.evaluating``).
    """
    if isinstance(loader, MultiInputLoader):  # every task on its own data, through its own head
        parts = {
            t: evaluate(
                _OneTask(model, t),
                loader.loaders[t],
                {t: task},
                device,
                autocast=autocast,
                channels_last=channels_last,
                metrics=metrics,
                confusion=confusion,
                reduce=reduce,
                progress=progress,
                desc=f"{desc} {t}",
            )
            for t, task in tasks.items()
        }
        per = {t: part.metrics[t] for t, part in parts.items() if t in part.metrics}
        return Evaluation(
            size=sum(part.size for part in parts.values()),
            metrics=per,
            confusion={t: c for part in parts.values() for t, c in part.confusion.items()},
            overall=overall(per, tasks) if per else {},
        )
    names = confusion_tasks(tasks) if confusion else []
    sizes = {t: tasks[t].confusion_classes() for t in names}
    confusion = {t: torch.zeros(n * n + 1, dtype=torch.long, device=device) for t, n in sizes.items()}  # + overflow
    meter = Meter(tasks, device) if metrics else None
    total = 0
    with evaluating(model):
        for batch in tqdm(
            iter(loader),  # tqdm.auto calls iter() on an iterable twice: a DataLoader would start its workers twice
            total=len(loader) if hasattr(loader, "__len__") else None,
            desc=desc,
            unit="batch",
            leave=False,
            disable=None if progress is None else not progress,
            dynamic_ncols=True,
        ):
            x = batch["image"].to(device, non_blocking=True)
            if channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            targets = {t: y.to(device, non_blocking=True) for t, y in batch["targets"].items()}
            with autocast() if autocast is not None else contextlib.nullcontext():
                outputs = model(x)
            n = x.shape[0]
            total += n
            for t in names:
                k = sizes[t]
                y = targets[t].reshape(-1).long()
                valid = (y >= 0) & (y < k)
                index = torch.where(valid, y * k + tasks[t].predict(outputs[t].float()).reshape(-1), k * k)
                confusion[t].index_add_(0, index, torch.ones_like(index))
            if meter is not None:
                losses = torch.stack([task.loss(outputs[t], targets[t]).detach() for t, task in tasks.items()])
                meter.update(losses, outputs, targets, n)
    if reduce:  # in task order, the same on every process
        confusion = {t: dist.all_reduce_sum(c) for t, c in confusion.items()}
    result = Evaluation(size=total, confusion={t: c[:-1].view(sizes[t], sizes[t]).cpu() for t, c in confusion.items()})
    if meter is not None:
        if reduce:
            meter.all_reduce()
        phase = meter.result()
        result.metrics = phase.pop("tasks")
        result.overall = phase
    return result


class _OneTask(nn.Module):
    """``model`` computing one task's output only (``model(x, tasks=(task,))``)."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.model(x, tasks=(self.task,))


# --------------------------------------------------------------------------- mtl eval
