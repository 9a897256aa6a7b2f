"""One training loop for every feature: train/val phases, AMP, hooks, resume."""
from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .checkpoint import rng_state, set_rng_state
from .freezing import L2SP
from .tasks import Task


class Hook:
    """Override any of these to act around training; hooks run in list order."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def on_resume(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def after_step(self, trainer: "Trainer", losses: Dict[str, Tensor]) -> None: ...
    def after_epoch(self, trainer: "Trainer", metrics: Dict[str, Any]) -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...


class _Meter:
    """Running sums per task on the device; one host sync per read."""

    def __init__(self, tasks: Mapping[str, Task], device: torch.device) -> None:
        self.sums = {t: torch.zeros(3, device=device, dtype=torch.float64) for t in tasks}  # loss*n, correct, n

    def update(self, task: str, loss: Tensor, correct: Tensor, n: int) -> None:
        self.sums[task] += torch.stack([loss.detach().double() * n, correct.double(), torch.tensor(n, device=loss.device, dtype=torch.float64)])

    def result(self, weights: Mapping[str, float]) -> Dict[str, Any]:
        per = {}
        for t, s in self.sums.items():
            loss_sum, correct, n = s.tolist()
            per[t] = {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1)}
        return {
            "loss": sum(weights[t] * m["loss"] for t, m in per.items()),
            "acc": sum(m["acc"] for m in per.values()) / len(per),
            "tasks": per,
        }


class Trainer:
    """Trains ``model`` on ``loaders["train"]``, validates on ``loaders["val"]`` each epoch.

    Metrics per phase: ``loss`` (weighted sum over tasks), ``acc`` (mean over tasks) and per-task
    values under ``tasks``. The epoch with the best validation accuracy is "best".
    """

    def __init__(self, model: nn.Module, tasks: Mapping[str, Task], loaders: Mapping[str, DataLoader],
                 optimizer: torch.optim.Optimizer, scheduler: Any, *, epochs: int, device: torch.device,
                 amp: bool = False, grad_clip: Optional[float] = None, l2sp: Optional[L2SP] = None,
                 hooks: Sequence[Hook] = (), progress: bool = True, seed: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        self.model, self.tasks, self.loaders = model, dict(tasks), dict(loaders)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.epochs, self.device, self.amp = epochs, device, amp
        self.grad_clip, self.l2sp, self.hooks = grad_clip, l2sp, list(hooks)
        self.progress, self.seed, self.generator = progress, seed, generator
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.best: Dict[str, Any] = {"acc": -math.inf, "epoch": None}
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ loop
    def fit(self) -> List[Dict[str, Any]]:
        self._call("before_train")
        while self.epoch < self.epochs:
            self._call("before_epoch")
            start = time.perf_counter()
            metrics: Dict[str, Any] = {"epoch": self.epoch + 1}
            metrics["train"] = self.run_phase("train")
            metrics["time_train_s"] = time.perf_counter() - start
            if "val" in self.loaders:
                metrics["val"] = self.run_phase("val")
            metrics["time_s"] = time.perf_counter() - start
            metrics["lr"] = [g["lr"] for g in self.optimizer.param_groups]
            score = metrics.get("val", metrics["train"])["acc"]
            metrics["is_best"] = score > self.best["acc"]
            if metrics["is_best"]:
                self.best = {"acc": score, "epoch": self.epoch + 1}
            self.epoch += 1
            self.history.append(metrics)
            self._call("after_epoch", metrics)
        self._call("after_train")
        return self.history

    def run_phase(self, phase: str) -> Dict[str, Any]:
        """One pass over ``loaders[phase]``; trains when phase is "train"."""
        train = phase == "train"
        self.model.train(train)
        if train and self.generator is not None:
            self.generator.manual_seed(self.seed * 100_003 + self.epoch)  # shuffle order = f(seed, epoch)
        meter = _Meter(self.tasks, self.device)
        loader = self.loaders[phase]
        bar = tqdm(loader, desc=f"{phase:5s} {self.epoch + 1}/{self.epochs}", leave=False,
                   disable=None if self.progress else True, dynamic_ncols=True)  # None: only on a terminal
        with torch.set_grad_enabled(train):
            for i, batch in enumerate(bar):
                losses = self.step(batch, meter, train)
                if train:
                    self._call("after_step", losses)
                if self.progress and (i % 10 == 0 or i == len(loader) - 1):
                    r = meter.result(self._weights())
                    bar.set_postfix(loss=f"{r['loss']:.4f}", acc=f"{r['acc']:.3f}")
        bar.close()
        return meter.result(self._weights())

    def step(self, batch: Mapping[str, Any], meter: _Meter, train: bool) -> Dict[str, Tensor]:
        x = batch["image"].to(self.device, non_blocking=True)
        targets = {t: y.to(self.device, non_blocking=True) for t, y in batch["targets"].items()}
        with self.autocast():
            outputs = self.model(x)
        losses = {t: task.loss(outputs[t], targets[t]) for t, task in self.tasks.items()}
        if train:
            total = sum(self.tasks[t].weight * loss for t, loss in losses.items())
            if self.l2sp is not None:
                total = total + self.l2sp.penalty()
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip)
            self.optimizer.step()
            if self.scheduler is not None:
                self.scheduler.step()
            self.global_step += 1
        for t, task in self.tasks.items():
            meter.update(t, losses[t], task.correct(outputs[t].detach(), targets[t]), x.shape[0])
        return losses

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _weights(self) -> Dict[str, float]:
        return {t: task.weight for t, task in self.tasks.items()}

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "best": self.best,
            "history": self.history,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was saved (hooks re-apply e.g. unfreezing first)."""
        self.model.load_state_dict(state["model"])
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best, self.history = dict(state["best"]), list(state["history"])
        self._call("on_resume")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
