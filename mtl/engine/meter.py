"""The running sums of a phase: per-task losses and metric states on the device, one host read per result."""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

import torch
from torch import Tensor

from mtl.core import distributed as dist
from mtl.tasks.base import Task


class Meter:
    """Running sums per task on the device (loss, metric state); one host sync per read."""

    def __init__(self, tasks: Mapping[str, Task], device: torch.device) -> None:
        self.tasks = tasks
        self.loss = torch.zeros(len(tasks), device=device, dtype=torch.float64)
        self.n = 0
        self.states = {t: task.init_state(device) for t, task in tasks.items()}

    def update(self, losses: Tensor, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], n: int) -> None:
        self.loss += losses.detach().double() * n
        self.n += n
        for t, task in self.tasks.items():
            self.states[t] = task.update(self.states[t], outputs[t].detach(), targets[t])

    def all_reduce(self) -> None:
        """Sum the running sums over processes (each saw its own share of the data)."""
        if dist.world_size() == 1:
            return
        self.loss = dist.all_reduce_sum(self.loss)
        self.n = int(dist.all_reduce_sum(torch.tensor(float(self.n), dtype=torch.float64, device=self.loss.device)))
        self.states = {t: dist.all_reduce_sum(s) for t, s in self.states.items()}

    def _count(self) -> Any:
        """The items behind each task's sums (at least 1)."""
        return max(self.n, 1)

    def mean_losses(self) -> Tensor:
        return (self.loss / self._count()).float()

    def result(self) -> Dict[str, Any]:
        """``loss`` (sum of static-weighted task losses), ``acc`` (mean, when every task has one), ``tasks``."""
        losses = (self.loss / self._count()).tolist()
        per = {}
        for (t, task), loss in zip(self.tasks.items(), losses):
            values = task.compute(self.states[t])
            report = getattr(task, "report", None)
            per[t] = {"loss": loss, **{k: v for k, v in values.items() if not report or k in report}}
        return {**overall(per, self.tasks), "tasks": per}


def overall(per: Mapping[str, Mapping[str, float]], tasks: Mapping[str, Task]) -> Dict[str, float]:
    """A phase's ``loss`` (the static-weighted sum of the task losses) and ``acc`` (their mean, when every task has
    one) from each task's metrics ``per``."""
    out = {"loss": sum(tasks[t].weight * m["loss"] for t, m in per.items())}
    if all("acc" in m for m in per.values()):
        out["acc"] = sum(m["acc"] for m in per.values()) / len(per)
    return out


class MultiInputMeter(Meter):
    """A ``Meter`` of a multi-input run: every task sees its own batch, so items are counted per task (``n``: a list
    in task order) and ``update`` takes the list of batch sizes."""

    def __init__(self, tasks: Mapping[str, Task], device: torch.device) -> None:
        super().__init__(tasks, device)
        self.n: List[int] = [0] * len(tasks)

    def update(
        self, losses: Tensor, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], n: Sequence[int]
    ) -> None:
        self.loss += losses.detach().double() * torch.tensor(n, dtype=torch.float64, device=self.loss.device)
        self.n = [a + b for a, b in zip(self.n, n)]
        for t, task in self.tasks.items():
            self.states[t] = task.update(self.states[t], outputs[t].detach(), targets[t])

    def all_reduce(self) -> None:
        if dist.world_size() == 1:
            return
        self.loss = dist.all_reduce_sum(self.loss)
        counts = torch.tensor(self.n, dtype=torch.float64, device=self.loss.device)
        self.n = [int(c) for c in dist.all_reduce_sum(counts).tolist()]
        self.states = {t: dist.all_reduce_sum(s) for t, s in self.states.items()}

    def _count(self) -> Any:
        return torch.tensor(self.n, dtype=torch.float64, device=self.loss.device).clamp(min=1)
