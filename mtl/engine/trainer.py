"""One training loop for every feature: train/val phases, AMP, hooks, resume."""

from __future__ import annotations

import contextlib
import copy
import itertools
import math
import signal
import threading
import time
from dataclasses import dataclass, fields, replace
from typing import (
    Any,
    Callable,
    Dict,
    Iterator,
    List,
    Mapping,
    Optional,
    Sequence,
    Tuple,
)

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mtl.core import distributed as dist
from mtl.core.checkpoint import rng_state, set_rng_state
from mtl.core.errors import UserError, out_of_memory
from mtl.data.batches import loader_batch_size
from mtl.data.loaders import reshuffled
from mtl.data.multi_input import MultiInputLoader
from mtl.engine.averaging import SWA, WeightEMA, recompute_bn_on_train
from mtl.engine.evaluate import evaluate
from mtl.engine.extension import StepExtension
from mtl.engine.meter import Meter, MultiInputMeter
from mtl.engine.monitor import default_monitor
from mtl.models.freezing import L2SP
from mtl.tasks.base import Task
from mtl.weighting import build_weighting
from mtl.weighting.base import Weighting
from mtl.weighting.bilevel import MetaProblem


class Hook:
    """Override any of these to act around training; hooks run in list order."""

    def before_train(self, trainer: "Trainer") -> None: ...
    def on_resume(self, trainer: "Trainer") -> None: ...
    def before_epoch(self, trainer: "Trainer") -> None: ...
    def before_step(self, trainer: "Trainer") -> None: ...  # trainer.steps_done: the training steps before this one
    def after_step(self, trainer: "Trainer", losses: Dict[str, Tensor]) -> None: ...
    def after_epoch(self, trainer: "Trainer", metrics: Dict[str, Any]) -> None: ...
    def after_train(self, trainer: "Trainer") -> None: ...
    def on_interrupt(self, trainer: "Trainer", state: Dict[str, Any]) -> None: ...


@dataclass
class TrainerOptions:
    """How the loop trains: plain settings, plus the two scoring functions and the shuffle generator.

    ``monitor`` and ``delta_m`` are settings expressed as functions (``train.monitor`` and ``train.baseline``,
    resolved against the tasks), so they live here; so does ``generator``, which the trainer re-seeds from
    ``seed`` each epoch (the two together fix the shuffle order). What the loop trains with or acts through
    (hooks, the weighting, the L2-SP penalty) stays a keyword argument of :class:`Trainer`.
    """

    epochs: int
    device: torch.device
    amp: bool = False  # bf16 autocast
    grad_clip: Optional[float] = None  # max gradient norm; None: no clipping
    progress: bool = True  # tqdm bars (process 0 only)
    seed: int = 0
    generator: Optional[torch.Generator] = None  # the train loader's shuffle generator, re-seeded each epoch
    grad_on: str = "params"  # gradient-level weightings: params | representation
    # phase metrics -> the score that picks the best epoch (higher is better); None: default_monitor (accuracy)
    monitor: Optional[Callable[[Dict[str, Any]], float]] = None
    delta_m: Optional[Callable[[Dict[str, Any]], float]] = None  # phase metrics -> delta_m % against baselines
    channels_last: bool = False  # image batches go in NHWC, like the model's weights
    nonfinite: str = "stop"  # a nan/inf loss: stop (UserError) | skip (no update) | off (no check)
    mix: Optional[Any] = None  # data.mix: a mtl.data.mix.BatchMix applied to every training batch; None: none
    # train.accumulate: one update per this many consecutive training batches (the epoch's last group may be shorter);
    # hooks' after_step then runs once per update, and a stop request takes effect at the end of a group
    accumulate: int = 1
    # train.steps: the run ends once this many training steps (updates, and steps train.nonfinite skips) are made in
    # all, the epoch it ends in cut short; None: ``epochs`` whole epochs
    steps: Optional[int] = None
    val_every: int = 1  # train.val_every: validate every N-th epoch and always the last one

    def __post_init__(self) -> None:
        if not isinstance(self.device, torch.device):  # "cpu", "cuda:0"
            self.device = torch.device(self.device)
        if self.monitor is None:
            self.monitor = default_monitor
        if self.grad_on not in ("params", "representation"):
            raise ValueError(f"grad_on must be params or representation, got {self.grad_on!r}")
        if self.nonfinite not in ("stop", "skip", "off"):
            raise ValueError(f"nonfinite must be stop, skip or off, got {self.nonfinite!r}")
        if isinstance(self.accumulate, bool) or not isinstance(self.accumulate, int) or self.accumulate < 1:
            raise ValueError(f"accumulate must be an integer >= 1, got {self.accumulate!r}")
        if self.steps is not None and (
            isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1
        ):
            raise ValueError(f"steps must be None or an integer >= 1, got {self.steps!r}")
        if isinstance(self.val_every, bool) or not isinstance(self.val_every, int) or self.val_every < 1:
            raise ValueError(f"val_every must be an integer >= 1, got {self.val_every!r}")


_OPTION_NAMES = tuple(f.name for f in fields(TrainerOptions))


def _option(name: str) -> property:
    """``trainer.<name>``: reads and writes ``trainer.options.<name>``."""
    return property(
        lambda self: getattr(self.options, name),
        lambda self, value: setattr(self.options, name, value),
        doc=f"``options.{name}``",
    )


class Trainer:
    """Trains ``model`` on ``loaders["train"]`` for ``epochs`` epochs (or until ``steps`` training steps are made),
    validates on ``loaders["val"]`` every ``val_every``-th epoch and after the last.

    Metrics per phase: ``loss`` (static-weighted sum over tasks), ``acc`` (mean over tasks, when all have
    one) and per-task values under ``tasks``. ``score`` (see ``monitor``; higher is better) picks "best".
    The task losses are combined by ``weighting`` (loss level) or, for gradient-level methods, their
    gradients w.r.t. the shared parameters (``grad_on="params"``) or the shared representation
    (``grad_on="representation"``: per-task gradients through the heads only, one backward through the encoder).

    Settings come in ``options`` (:class:`TrainerOptions`) or, as before it existed, as keyword arguments named
    like its fields (``Trainer(..., epochs=3, device=dev)``); a keyword given with ``options`` overrides that
    field (``options`` itself is not changed). An unknown keyword is a TypeError. Each setting stays readable and
    writable as an attribute: ``trainer.epochs`` is ``trainer.options.epochs``.
    """

    epochs = _option("epochs")
    device = _option("device")
    amp = _option("amp")
    grad_clip = _option("grad_clip")
    progress = _option("progress")
    seed = _option("seed")
    generator = _option("generator")
    grad_on = _option("grad_on")
    monitor = _option("monitor")
    delta_m = _option("delta_m")
    channels_last = _option("channels_last")
    nonfinite = _option("nonfinite")
    mix = _option("mix")
    accumulate = _option("accumulate")
    steps = _option("steps")
    val_every = _option("val_every")

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[str, Task],
        loaders: Mapping[str, DataLoader],
        optimizer: torch.optim.Optimizer,
        scheduler: Any = None,
        options: Optional[TrainerOptions] = None,
        *,
        hooks: Sequence[Hook] = (),
        weighting: Optional[Weighting] = None,
        l2sp: Optional[L2SP] = None,
        extension: Optional[StepExtension] = None,
        ema: Optional[WeightEMA] = None,
        swa: Optional[SWA] = None,
        **settings: Any,
    ) -> None:
        unknown = [k for k in settings if k not in _OPTION_NAMES]
        if unknown:
            raise TypeError(f"Trainer() got an unexpected keyword argument {unknown[0]!r}")
        self.options = replace(options, **settings) if options is not None else TrainerOptions(**settings)
        self.model, self.tasks, self.loaders = model, dict(tasks), dict(loaders)
        self.optimizer, self.scheduler = optimizer, scheduler
        self.l2sp, self.hooks = l2sp, list(hooks)
        self.weighting = weighting if weighting is not None else _default_weighting(self.tasks).to(self.device)
        if extension is not None and self.weighting.gradient_level:
            raise UserError(
                f"a step extension (a continual learner's penalty, replay or projection) works with loss-level "
                f"weightings only, not {type(self.weighting).__name__}; use weighting.name=equal"
            )
        self.extension = extension
        # weight averages (train.ema, train.swa): ``ema`` is validated every epoch as "val_ema" and selects the best
        # epoch; ``swa`` is finished after the last epoch into ``swa_result`` (mtl.engine.averaging)
        self.ema, self.swa = ema, swa
        self.swa_result: Optional[Dict[str, Any]] = None
        _check_accumulate(self.options, self.weighting, extension)
        self._position = 0  # the index in the epoch of the current step's first training batch (data.mix draws)
        self.skipped_steps = 0
        self._weight_sum: Optional[Tensor] = None  # the task weights summed over this epoch's updates
        self._weight_steps = 0
        self._stop_requested = False
        self._end_requested = False
        self._partial: Optional[Dict[str, Any]] = None  # where an interrupted epoch resumes
        self._meta: Dict[str, Any] = {}  # bilevel weightings' meta batches: epoch, position (checkpointed), iterator
        self.epoch = 0  # completed epochs
        self.global_step = 0
        self.steps_done = 0  # training steps made (updates, and steps train.nonfinite skipped): what steps counts
        self.best: Dict[str, Any] = {"score": -math.inf, "epoch": None}
        # the confusion matrices ({task: (C, C) counts, rows true}) of the validation pass that made the best epoch
        # best (the EMA weights' with train.ema; SWA's once delivered), drawn at the end without another pass
        self.best_confusion: Dict[str, Tensor] = {}
        self._confusion: Optional[Tuple[str, int, Dict[str, Tensor]]] = None  # the last evaluation's (phase, epoch, ..)
        self.history: List[Dict[str, Any]] = []

    # ------------------------------------------------------------------ loop
    def fit(self) -> List[Dict[str, Any]]:
        """Train the remaining epochs. SIGINT or SIGTERM stops after the current step: hooks get ``on_interrupt``
        with a resumable state (``CheckpointHook`` saves it as ``last.pt``), then KeyboardInterrupt is raised."""
        with _stop_signals(self):
            return self._fit()

    def _fit(self) -> List[Dict[str, Any]]:
        self._call("before_train")
        while self.epoch < self.epochs and not self._end_requested and not self._budget_spent():
            self._call("before_epoch")
            start = time.perf_counter()
            metrics: Dict[str, Any] = {"epoch": self.epoch + 1}
            metrics["train"] = self._guarded_phase("train")
            metrics["time_train_s"] = time.perf_counter() - start
            if self.swa is not None:
                self.swa.end_epoch(self.model, self.epoch)
            if "val" in self.loaders and self._validation_due():
                metrics["val"] = self._guarded_phase("val")
                if self.ema is not None:
                    metrics["val_ema"] = self._averaged_phase(self.ema.module, "val")
            metrics["time_s"] = time.perf_counter() - start
            metrics["lr"] = [g["lr"] for g in self.optimizer.param_groups]
            if len(self.tasks) > 1:
                metrics["weights"] = dict(zip(self.tasks, self._epoch_weights().tolist()))
            metrics["score"] = self._epoch_score(metrics)
            metrics["is_best"] = metrics["score"] is not None and metrics["score"] > self.best["score"]
            if metrics["is_best"]:
                self.best = {"score": metrics["score"], "epoch": self.epoch + 1}
                self.best_confusion = self._val_confusion()
            self.epoch += 1
            self.history.append(metrics)
            self._call("after_epoch", metrics)
        if self.swa is not None and self.swa.count > 0:
            self.swa_result = self._finish_swa()
        self._call("after_train")
        return self.history

    def _budget_spent(self) -> bool:
        """The step budget (``steps``) is used up, and no interrupted epoch is left to finish."""
        return self.steps is not None and self.steps_done >= self.steps and self._partial is None

    def _validation_due(self) -> bool:
        """This epoch validates: every ``val_every``-th epoch, and the run's last one (``epochs`` reached, the step
        budget spent, or training asked to end); the same decision on every process and after a resume."""
        last = self.epoch + 1 >= self.epochs or self._budget_spent() or self._end_requested
        return last or (self.epoch + 1) % self.val_every == 0

    def _epoch_score(self, metrics: Mapping[str, Any]) -> Optional[float]:
        """The score (``monitor``) of the epoch's validation (of the EMA weights with ``ema``), of its training metrics
        without validation data; None for an epoch that did not validate (``val_every``): it cannot be best."""
        if "val" in self.loaders and "val" not in metrics:
            return None
        return self.monitor(metrics.get("val_ema", metrics.get("val", metrics["train"])))

    def steps_per_epoch(self) -> int:
        """The training steps of a whole epoch (one per ``accumulate`` batches, or per the weighting's samples)."""
        return self._steps_per_epoch(self.loaders["train"])[1]

    def _averaged_phase(self, model: nn.Module, phase: str) -> Dict[str, Any]:
        """``phase``'s evaluation of ``model`` (an average of the trained weights) instead of the trained model."""
        trained, self.model = self.model, model
        try:
            return self._guarded_phase(phase)
        finally:
            self.model = trained

    def _finish_swa(self) -> Dict[str, Any]:
        """SWA's end: BatchNorm statistics of the averaged weights from one pass over the training split (shuffled,
        with its training transforms, order and random draws seeded by ``seed``; every process the whole split), then
        its validation. ``delivered``: its score (``monitor``) beats the best epoch's, so that it becomes best.pt."""
        batches = recompute_bn_on_train(self.swa.module, self)
        result: Dict[str, Any] = {"epochs": list(self.swa.epochs), "bn_batches": batches, "val": None, "score": None}
        if "val" in self.loaders:
            result["val"] = self._averaged_phase(self.swa.module, "val")
            result["score"] = self.monitor(result["val"])
        result["delivered"] = result["score"] is not None and result["score"] > self.best["score"]
        if result["delivered"]:
            self.best_confusion = self._val_confusion()
        return result

    def _val_confusion(self) -> Dict[str, Tensor]:
        """The confusion matrices of this epoch's last validation pass (the one that selects: after the trained
        weights', the EMA's or SWA's), or none when this epoch was not validated."""
        if self._confusion is None:
            return {}
        phase, epoch, matrices = self._confusion
        return matrices if phase == "val" and epoch == self.epoch else {}

    def _guarded_phase(self, phase: str) -> Dict[str, Any]:
        try:
            return self.run_phase(phase)
        except (MemoryError, RuntimeError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
            if not out_of_memory(e):
                raise
            size = loader_batch_size(self.loaders[phase])
            key = "data.batch_size" if phase == "train" else "data.val_batch_size"
            gpu = isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA" in str(e)
            raise UserError(
                f"out of {'GPU' if gpu else 'CPU'} memory in the {phase} phase at batch size {size}; try "
                f"{key}={max(size // 2, 1)} (or a smaller data.image_size" + (", or train.amp=bf16)" if gpu else ")")
            ) from None

    def run_phase(self, phase: str) -> Dict[str, Any]:
        """One pass over ``loaders[phase]``: trains when phase is "train", else evaluates (``engine.evaluate``)."""
        result = self._train_phase() if phase == "train" else self._evaluate_phase(phase)
        if self.delta_m is not None:
            result["delta_m"] = self.delta_m(result)
        return result

    def _evaluate_phase(self, phase: str) -> Dict[str, Any]:
        ev = evaluate(
            self.model,
            self.loaders[phase],
            self.tasks,
            self.device,
            autocast=self.autocast,
            channels_last=self.channels_last,
            reduce=True,
            progress=None if self.progress and dist.is_main() else False,
            desc=f"{phase:5s} {self.epoch + 1}/{self.epochs}",
        )
        self._confusion = (phase, self.epoch, ev.confusion)
        return {**ev.overall, "tasks": ev.metrics}

    def _train_phase(self) -> Dict[str, Any]:
        self.model.train(True)
        for module in self.model.modules():  # e.g. LTB's temperature follows the epoch
            if hasattr(module, "set_epoch"):
                module.set_epoch(self.epoch)
        if self.generator is not None:
            self.generator.manual_seed(self.seed * 100_003 + self.epoch)  # shuffle order = f(seed, epoch)
        meter = (MultiInputMeter if isinstance(self.loaders["train"], MultiInputLoader) else Meter)(
            self.tasks, self.device
        )
        self._weight_sum, self._weight_steps = torch.zeros(len(self.tasks), device=self.device), 0
        loader = self.loaders["train"]
        samples, steps = self._steps_per_epoch(loader)
        batches, done = iter(loader), 0
        if self._partial is not None:  # resume inside this epoch: same batches, same random draws
            partial, self._partial = self._partial, None
            for _ in range(partial["step"]):
                next(batches)
            done = partial["step"]
            meter.loss, meter.n = partial["meter_loss"].to(self.device), partial["meter_n"]
            meter.states = {t: v.to(self.device) for t, v in partial["meter_states"].items()}
            if "weight_sum" in partial:  # checkpoints from before epoch-mean weights lack it
                self._weight_sum = partial["weight_sum"].to(self.device)
                self._weight_steps = partial["weight_steps"]
            set_rng_state(partial["rng"])
        if samples > 1:  # steps of `samples` consecutive batches; `done` counts batches, so that resume skips them
            batches, done = _grouped(batches, samples, steps - done // samples), done // samples
        group = self.accumulate
        if group > 1:  # updates of `group` consecutive batches; a resumed epoch starts at a group's end
            batches, done = _accumulated(batches, group, len(loader) - done), done // group
        if self.steps is not None:  # the step budget ends this epoch early
            left = max(self.steps - self.steps_done, 0)
            batches, steps = itertools.islice(batches, left), min(steps, done + left)
        bar = tqdm(
            batches,
            total=steps,
            initial=done,
            desc=f"train {self.epoch + 1}/{self.epochs}",
            leave=False,
            disable=None if self.progress and dist.is_main() else True,
            dynamic_ncols=True,
        )
        with torch.enable_grad():
            for i, batch in enumerate(bar, start=done):
                self._position = i * samples * group
                self._call("before_step")
                if group > 1:
                    losses = self._accumulate_step(batch, meter)
                else:
                    losses = self.step(batch, meter, True) if samples == 1 else self._samples_step(batch, meter)
                self.steps_done += 1
                self._call("after_step", losses)
                if self._should_stop():
                    bar.close()
                    self._interrupt(min((i + 1) * samples * group, len(loader)), meter)
                if self.progress and (i % 10 == 0 or i == steps - 1):
                    bar.set_postfix(_postfix(meter.result()))
        bar.close()
        meter.all_reduce()
        self.weighting.end_epoch(meter.mean_losses())
        return meter.result()

    def step(self, batch: Mapping[str, Any], meter: Meter, train: bool) -> Dict[str, Tensor]:
        if "inputs" in batch:  # multi-input: every task its own batch
            return self._multi_input_step(batch, meter, train)
        x, targets, shown = self._inputs(batch, train)
        representation = train and self.weighting.gradient_level and self.grad_on == "representation"
        # a skipped step leaves no trace: the weighting's state (running targets, learned weights, random draws) and
        # the model's buffers (BatchNorm statistics, which the forward pass moves) are put back as they were
        saved = self._snapshot() if train and self.nonfinite == "skip" else None
        if train and self.weighting.bilevel:
            self._meta_step(x, targets)
        features = rep = None
        with self.autocast():
            if representation:
                features = self.model.encode(x)
                rep = {k: v.detach().requires_grad_(v.requires_grad) for k, v in features.items()}
                outputs = self.model.decode(rep, tuple(x.shape[-2:]))
            else:
                outputs = self.model(x)
        return self._step_outputs(outputs, targets, x.shape[0], meter, train, saved, features, rep, x=x, shown=shown)

    def _inputs(
        self, batch: Mapping[str, Any], train: bool, offset: int = 0
    ) -> Tuple[Tensor, Dict[str, Tensor], Dict[str, Tensor]]:
        """A batch's images and targets on the device: on a training step mixed by ``data.mix`` (the draw of batch
        ``_position + offset`` of the epoch), then in NHWC with ``channels_last``. Returns ``(x, targets, shown)``,
        ``shown``: the targets the metrics count (each image's larger-weight label when mixed)."""
        x = batch["image"].to(self.device, non_blocking=True)
        targets = {t: y.to(self.device, non_blocking=True) for t, y in batch["targets"].items()}
        shown = targets
        if train and self.mix is not None:
            x, targets, shown = self.mix(x, targets, self.tasks, self.epoch, self._position + offset)
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, targets, shown

    def _step_outputs(
        self,
        outputs: Dict[str, Tensor],
        targets: Dict[str, Tensor],
        n: Any,
        meter: Meter,
        train: bool,
        saved: Optional[Dict[str, Any]],
        features: Optional[Dict[str, Tensor]] = None,
        rep: Optional[Dict[str, Tensor]] = None,
        x: Optional[Tensor] = None,
        shown: Optional[Dict[str, Tensor]] = None,
    ) -> Dict[str, Tensor]:
        """The rest of a step, from the task outputs: losses, the weighting's update (``features`` and ``rep``: the
        encoder's output and its detached copy, with ``grad_on: representation``), the running metrics (``n``: the
        batch size, per task in a multi-input run; ``x``: the inputs, for a step extension; ``shown``: the targets the
        metrics count, when not ``targets``)."""
        representation = features is not None
        # gradient methods differentiate each loss on its own: indexing the stacked tensor instead would send
        # (zero) gradients through every other task's head as well
        each, local = self._task_losses(outputs, targets, train)
        losses = torch.stack(each)
        if train:
            self.optimizer.zero_grad(set_to_none=True)
            if not self.weighting.gradient_level:
                total = self.weighting(losses, self._shared())
                if self.l2sp is not None:
                    total = total + self.l2sp.penalty()
                extra = self.extension.extra_loss(self.model, x, targets, outputs) if self.extension else None
                if extra is not None:
                    total = total + extra
                total.backward()
                self._average_gradients()
                if self.extension is not None:
                    self.extension.before_update(self.model)
                ok = self._finite(losses, grads=self._trained_grads())
            elif representation:
                ok = self._representation_backward(each, features, rep)
                if ok:
                    self._average_gradients()  # each process balanced the gradients of its own batch
                    ok = self._finite(None, grads=self._trained_grads())
            else:
                ok = self._parameter_backward(each)  # per-task gradients averaged over processes before combining
            if not ok:
                self.optimizer.zero_grad(set_to_none=True)
                self._restore(saved)
                return dict(zip(self.tasks, losses.detach()))  # skipped: no update, not counted
            self._update()
            if self.extension is not None:
                self.extension.after_update(self.model, x, targets, outputs)
        meter.update(local, outputs, targets if shown is None else shown, n)
        return dict(zip(self.tasks, losses.detach()))

    def _task_losses(
        self, outputs: Mapping[str, Tensor], targets: Mapping[str, Tensor], train: bool = True
    ) -> Tuple[List[Tensor], Tensor]:
        """Each task's loss (a list: gradient methods differentiate each on its own) and their detached local values.
        In training under torchrun each loss takes the value of its mean over the processes, while its gradient
        stays this process's own."""
        each = [task.loss(outputs[t], targets[t]) for t, task in self.tasks.items()]
        local = torch.stack([loss.detach() for loss in each])
        if train and dist.world_size() > 1:
            mean = dist.all_reduce_sum(local) / dist.world_size()
            each = [loss + (m - loss.detach()) for loss, m in zip(each, mean)]
        return each, local

    def _update(self) -> None:
        """The optimizer step from the gradients in place (clipped by ``grad_clip``), the scheduler's, the counts."""
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]], self.grad_clip
            )
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.model)
        if self._weight_sum is not None:
            self._weight_sum += self.weighting.last_weights.detach().to(self._weight_sum.device)
            self._weight_steps += 1

    def _multi_input_step(self, batch: Mapping[str, Any], meter: Meter, train: bool) -> Dict[str, Tensor]:
        """A step of a multi-input run (``batch["inputs"]``: one batch per task): each task's images through the shared
        encoder and that task's head only; the task losses then take the same weighting path as ``step``'s."""
        if train and self.weighting.gradient_level and self.grad_on == "representation":
            raise UserError(
                "weighting.grad_on=representation needs one shared representation, but a multi-input run encodes "
                "each task's own images; use weighting.grad_on=params"
            )
        saved = self._snapshot() if train and self.nonfinite == "skip" else None
        outputs, targets, sizes = {}, {}, []
        for t in self.tasks:
            part = batch["inputs"][t]
            x = part["image"].to(self.device, non_blocking=True)
            if self.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            targets[t] = part["targets"][t].to(self.device, non_blocking=True)
            with self.autocast():
                outputs[t] = self.model(x, tasks=(t,))[t]
            sizes.append(x.shape[0])
        return self._step_outputs(outputs, targets, sizes, meter, train, saved)

    def _finite(
        self, losses: Optional[Tensor], task_grads_bad: Optional[Tensor] = None, grads: Sequence[Tensor] = ()
    ) -> bool:
        """True when the step may go on. A nan/inf loss, task gradient (``task_grads_bad``: (T,) bool) or combined
        gradient (``grads``) skips the step (False) or stops the run (UserError), by ``train.nonfinite``; ``off``
        checks nothing. One host read; under torchrun every process takes the same decision."""
        if self.nonfinite == "off":
            return True
        t = len(self.tasks)
        device = self.device
        flags = torch.cat(
            [
                ~torch.isfinite(losses.detach())
                if losses is not None
                else torch.zeros(t, dtype=torch.bool, device=device),
                task_grads_bad.to(device)
                if task_grads_bad is not None
                else torch.zeros(t, dtype=torch.bool, device=device),
                torch.stack([~torch.isfinite(g).all() for g in grads]).any().view(1)
                if grads
                else torch.zeros(1, dtype=torch.bool, device=device),
            ]
        )
        if dist.world_size() > 1:
            flags = dist.all_reduce_sum(flags.float()) > 0
        flags = flags.tolist()
        if not any(flags):
            return True
        bad_loss, bad_grad = flags[:t], flags[t : 2 * t]
        where = f"at epoch {self.epoch + 1}, step {self.global_step + 1}"
        if any(bad_loss):
            what = "loss"
            names = [n for n, b in zip(self.tasks, bad_loss) if b]
            detail = (
                f"non-finite loss ({', '.join(f'{v:g}' for v in losses.detach().tolist())}) in task {', '.join(names)}"
            )
        elif any(bad_grad):
            what = "gradient"
            names = [n for n, b in zip(self.tasks, bad_grad) if b]
            detail = f"non-finite gradient of task {', '.join(names)}'s loss (the loss itself is finite)"
        else:
            what = "gradient"
            detail = "non-finite gradient of the combined loss (every task loss is finite)"
        if self.nonfinite == "skip":
            self.skipped_steps += 1
            tqdm.write(f"{detail} {where}: step skipped ({self.skipped_steps} so far)")
            return False
        hint = "set train.grad_clip" if what == "loss" else "check the loss for operations without a gradient at 0"
        raise UserError(
            f"{detail} {where}; the last good checkpoint is kept; lower optim.lr, {hint}, or train.nonfinite=skip"
        )

    def _snapshot(self) -> Dict[str, Any]:
        generator = getattr(self.extension, "generator", None)
        return {
            "weighting": copy.deepcopy(self.weighting.state_dict()),
            "buffers": [b.detach().clone() for b in self.model.buffers()],
            "extension_rng": generator.get_state() if generator is not None else None,
        }

    def _restore(self, saved: Dict[str, Any]) -> None:
        self.weighting.load_state_dict(saved["weighting"])
        if saved["extension_rng"] is not None:  # a replay draw of a skipped step is drawn again
            self.extension.generator.set_state(saved["extension_rng"])
        with torch.no_grad():
            for b, old in zip(self.model.buffers(), saved["buffers"]):
                b.copy_(old)

    def _trained_grads(self) -> List[Tensor]:
        return [p.grad for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]

    def _epoch_weights(self) -> Tensor:
        """The task weights of this epoch: their mean over its updates (the latest when none was made)."""
        if self._weight_sum is None or self._weight_steps == 0:
            return self.weighting.last_weights
        return self._weight_sum / self._weight_steps

    def end_training(self) -> None:
        """Train no further epoch: the loop ends after this epoch's hooks (before the first epoch when called from
        ``before_train`` or ``on_resume``), and ``after_train`` runs as after the last epoch."""
        self._end_requested = True

    def request_stop(self) -> None:
        """Stop after the current training step with a resumable checkpoint (what SIGINT/SIGTERM do)."""
        self._stop_requested = True

    def _should_stop(self) -> bool:
        if dist.world_size() == 1:
            return self._stop_requested
        flag = torch.tensor([float(self._stop_requested)], device=self.device)
        return bool(dist.all_reduce_sum(flag).item() > 0)  # every process stops at the same step

    def _interrupt(self, step: int, meter: Meter) -> None:
        state = self.state_dict()
        state["partial"] = {
            "step": step,
            "meter_loss": meter.loss.cpu(),
            "meter_n": meter.n,
            "meter_states": {t: v.cpu() for t, v in meter.states.items()},
            "weight_sum": self._weight_sum.cpu() if self._weight_sum is not None else torch.zeros(len(self.tasks)),
            "weight_steps": self._weight_steps,
            "rng": state["rng"],
        }
        self._call("on_interrupt", state)
        raise KeyboardInterrupt

    def _average_gradients(self) -> None:
        if dist.world_size() > 1:
            dist.all_reduce_mean_([p.grad for g in self.optimizer.param_groups for p in g["params"]])

    # ------------------------------------------------------------------ gradient-level weighting
    def _shared(self) -> List[nn.Parameter]:
        return [p for p in self.model.shared_parameters() if p.requires_grad]

    def _owned(self) -> List[nn.Parameter]:
        return [p for p in self.model.task_parameters() if p.requires_grad]

    def _parameter_backward(self, losses: List[Tensor]) -> bool:
        shared = self._shared()
        if not shared:
            raise UserError(
                "gradient-level weighting needs trainable shared (encoder) parameters, but the encoder "
                "is frozen; use a loss-level weighting (e.g. weighting.name=equal) or unfreeze the encoder"
            )
        owned = self._owned()
        losses = self.weighting.transform_losses(losses)
        grads, owned_grads = _task_gradients(losses, shared, owned)
        dist.all_reduce_mean_([grads, *(g for per_task in owned_grads for g in per_task)])
        if not self._finite(torch.stack(losses).detach(), _nonfinite_rows(grads, owned_grads)):
            return False
        d, w = self.weighting(grads, torch.stack(losses).detach())
        _set_owned_grads(owned, owned_grads, w)
        self._set_shared_grads(shared, d)
        return True

    def _set_shared_grads(self, shared: Sequence[nn.Parameter], d: Tensor) -> None:
        """The shared parameters get the combined gradient ``d`` (flattened in their order), plus L2-SP's."""
        offset = 0
        for p in shared:
            n = p.numel()
            p.grad = d[offset : offset + n].view_as(p).to(p.dtype)
            offset += n
        if self.l2sp is not None:
            self.l2sp.penalty().backward()

    def _representation_backward(
        self, losses: List[Tensor], features: Dict[str, Tensor], rep: Dict[str, Tensor]
    ) -> bool:
        keys = [k for k, v in features.items() if v.requires_grad]
        if not keys:
            raise UserError(
                "weighting.grad_on=representation needs a trainable encoder, but it is frozen; "
                "use a loss-level weighting or unfreeze the encoder"
            )
        owned = self._owned()
        losses = self.weighting.transform_losses(losses)
        grads, owned_grads = _task_gradients(losses, [rep[k] for k in keys], owned)
        if not self._finite(torch.stack(losses).detach(), _nonfinite_rows(grads, owned_grads)):
            return False
        if self.weighting.needs_representation:  # GradDrop: the features themselves, in the order of grads' columns
            self.weighting.representation = [rep[k].detach() for k in keys]
        d, w = self.weighting(grads, torch.stack(losses).detach())
        _set_owned_grads(owned, owned_grads, w)
        chunks, offset = [], 0
        for k in keys:
            n = rep[k].numel()
            chunks.append(d[offset : offset + n].view_as(rep[k]).to(features[k].dtype))
            offset += n
        extra = self.l2sp.penalty() if self.l2sp is not None else None
        torch.autograd.backward(
            [features[k] for k in keys] + ([extra] if extra is not None else []),
            chunks + ([torch.ones_like(extra)] if extra is not None else []),
        )
        return True

    def _steps_per_epoch(self, loader: Any) -> Tuple[int, int]:
        """``(samples, steps)``: the weighting's batches per step, and the training steps of one pass over ``loader``
        (``len(loader) // samples``: the last ``len(loader) % samples`` batches of an epoch are left out)."""
        samples = self.weighting.samples
        if self.accumulate > 1:
            return 1, updates_per_epoch(len(loader), 1, self.accumulate)
        if samples > 1 and len(loader) < samples:
            raise UserError(
                f"weighting {type(self.weighting).__name__} takes {samples} batches per step, but the training data "
                f"gives {len(loader)} per epoch{' on each process' if dist.world_size() > 1 else ''}; "
                f"lower data.batch_size (or use more training data)"
            )
        return samples, len(loader) // samples

    def _samples_step(self, batches: Sequence[Mapping[str, Any]], meter: Meter) -> Dict[str, Tensor]:
        """One training step from ``S = weighting.samples`` batches (MoDo, SDMGrad): each batch's (T, D) task gradients
        w.r.t. the shared parameters (averaged over processes, as in :meth:`_parameter_backward`) go to the weighting
        together, (S, T, D) with the losses (S, T); its ``d`` replaces the shared gradient, and the heads get the
        gradient of ``sum_t w_t L_t`` on the last batch, the one ``d`` combines. ``meter`` counts every batch of a step
        that is taken. Returns the task losses averaged over the batches."""
        if self.grad_on == "representation":
            raise UserError(
                f"weighting {type(self.weighting).__name__} combines the task gradients of {len(batches)} batches, "
                f"which needs gradients with respect to the shared parameters; set weighting.grad_on=params"
            )
        shared, owned = self._shared(), self._owned()
        if not shared:
            raise UserError(
                f"weighting {type(self.weighting).__name__} balances gradients of the shared (encoder) parameters, but "
                f"the encoder is frozen; use a loss-level weighting (e.g. weighting.name=equal) or unfreeze the encoder"
            )
        saved = self._snapshot() if self.nonfinite == "skip" else None
        self.optimizer.zero_grad(set_to_none=True)
        rows, values, plain, seen, heads = [], [], [], [], []
        for s, batch in enumerate(batches):
            x, targets, shown = self._inputs(batch, True, s)
            with self.autocast():
                outputs = self.model(x)
            each, local = self._task_losses(outputs, targets)
            plain.append(torch.stack([loss.detach() for loss in each]))
            each = self.weighting.transform_losses(each)
            grads, heads = _task_gradients(each, shared, owned if s == len(batches) - 1 else ())
            rows.append(grads)
            values.append(torch.stack(each).detach())
            seen.append((local, {t: o.detach() for t, o in outputs.items()}, shown, x.shape[0]))
        grads, losses = torch.stack(rows), torch.stack(values)
        dist.all_reduce_mean_([grads, *(g for per_task in heads for g in per_task)])
        bad = (~torch.isfinite(grads).all(2)).any(0) | _nonfinite_rows(grads[-1], heads)
        if not self._finite(losses.mean(0), bad):  # a non-finite loss in any batch makes its mean non-finite
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(saved)
            return dict(zip(self.tasks, torch.stack(plain).mean(0)))  # skipped: no update, not counted
        d, w = self.weighting(grads, losses)
        _set_owned_grads(owned, heads, w)
        self._set_shared_grads(shared, d)
        self._update()
        for args in seen:
            meter.update(*args)
        return dict(zip(self.tasks, torch.stack(plain).mean(0)))

    def _accumulate_step(self, batches: Sequence[Mapping[str, Any]], meter: Meter) -> Dict[str, Tensor]:
        """One update from the consecutive ``batches`` (``train.accumulate``), as from one batch of all their items:
        each batch's total loss (the weighting's, plus L2-SP's penalty) is backpropagated times its size, the summed
        gradients are divided by the group's item count, then averaged over processes, clipped and applied once. Exact
        for a weighting whose total is affine in the task losses with coefficients fixed within the update (equal,
        static, uncertainty, dwa) and losses that average over images (or a fixed count of values per image: not a
        segmentation loss over a varying number of labelled pixels); BatchNorm layers still normalise each batch by
        its own statistics. A non-finite loss or gradient in any batch skips (or stops at) the whole update. Returns
        the size-weighted mean task losses."""
        saved = self._snapshot() if self.nonfinite == "skip" else None
        kept = (meter.loss.clone(), copy.copy(meter.n), dict(meter.states)) if saved is not None else None
        self.optimizer.zero_grad(set_to_none=True)
        items, summed = 0, torch.zeros(len(self.tasks), device=self.device)
        for k, batch in enumerate(batches):
            x, targets, shown = self._inputs(batch, True, k)
            with self.autocast():
                outputs = self.model(x)
            each, local = self._task_losses(outputs, targets)
            losses = torch.stack(each)
            total = self.weighting(losses, self._shared())
            if self.l2sp is not None:
                total = total + self.l2sp.penalty()
            n = x.shape[0]
            (total * n).backward()
            items += n
            summed += losses.detach().float() * n
            meter.update(local, outputs, shown, n)
        for g in self._trained_grads():
            g.div_(items)
        self._average_gradients()
        mean_losses = summed / items
        if not self._finite(mean_losses, grads=self._trained_grads()):  # a nan/inf in any batch stays in the sums
            self.optimizer.zero_grad(set_to_none=True)
            self._restore(saved)
            meter.loss, meter.n, meter.states = kept
            return dict(zip(self.tasks, mean_losses))  # skipped: no update, none of its batches counted
        self._update()
        return dict(zip(self.tasks, mean_losses))

    # ------------------------------------------------------------------ bilevel weighting
    def _meta_step(self, x: Tensor, targets: Dict[str, Tensor]) -> None:
        """A bilevel weighting's update before this step (``weighting.meta_step``), from this step's batch and the
        next meta batch."""
        meta = self._meta_batch()
        mx = meta["image"].to(self.device, non_blocking=True)
        if self.channels_last and mx.ndim == 4:
            mx = mx.contiguous(memory_format=torch.channels_last)
        mt = {t: y.to(self.device, non_blocking=True) for t, y in meta["targets"].items()}
        losses = {t: self.tasks[t].loss for t in self.weighting.tasks}
        with MetaProblem(self.model, losses, self.optimizer, (x, targets), (mx, mt), self.l2sp) as problem:
            self.weighting.meta_step(problem)

    def _meta_batch(self) -> Dict[str, Any]:
        """The next batch of this epoch's independent reshuffle of the training split (as the authors of Auto-Lambda
        draw their meta batches), never of the split that selects results. The reshuffle and each batch's
        augmentation are seeded by (train seed, epoch, position) and draw nothing from the global random state, so
        a resumed run, which skips the ``position`` batches drawn before, continues with the same meta batches."""
        if "train" not in self.loaders:
            raise UserError("a bilevel weighting draws meta batches from the training loader; pass loaders['train']")
        if self._meta.get("epoch") != self.epoch:
            self._meta = {"epoch": self.epoch, "position": 0}
        seed = ((self.seed * 100_003 + self.epoch) * 1_000_003 + 7_919) % 2**62
        if self._meta.get("batches") is None:
            loader = reshuffled(self.loaders["train"], torch.Generator().manual_seed(seed))
            self._meta["batches"] = iter(loader)
            for position in range(self._meta["position"]):
                self._draw_meta(seed + position)
        batch = self._draw_meta(seed + self._meta["position"])
        self._meta["position"] += 1
        return batch

    def _draw_meta(self, seed: int) -> Dict[str, Any]:
        with torch.random.fork_rng(devices=[]):  # per-item transforms draw from the global CPU generator
            torch.default_generator.manual_seed(seed)
            try:
                return next(self._meta["batches"])
            except StopIteration:  # (a reshuffle has as many batches as the epoch) a custom loader ran out: again
                self._meta["batches"] = iter(reshuffled(self.loaders["train"], torch.Generator().manual_seed(seed)))
                return next(self._meta["batches"])

    def autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _call(self, event: str, *args: Any) -> None:
        for hook in self.hooks:
            getattr(hook, event)(self, *args)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "weighting": self.weighting.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "steps_done": self.steps_done,
            "best": self.best,
            "best_confusion": self.best_confusion,
            "history": self.history,
            "rng": rng_state(),
            "meta_batches": {k: self._meta[k] for k in ("epoch", "position") if k in self._meta},
            **({"extension": self.extension.state_dict()} if self.extension is not None else {}),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            **({"swa": self.swa.state_dict()} if self.swa is not None else {}),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue exactly where ``state`` was saved (hooks re-apply e.g. unfreezing first)."""
        self.model.load_state_dict(state["model"])
        if "weighting" in state:  # checkpoints from before weightings counted their random draws lack that entry
            weighting = dict(state["weighting"])
            weighting.setdefault("_extra_state", {"draws": 0})
            self.weighting.load_state_dict(weighting)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.steps_done = state.get("steps_done", self.global_step)  # checkpoints from before step budgets lack it
        self.best, self.history = dict(state["best"]), list(state["history"])
        self.best_confusion = dict(state.get("best_confusion") or {})  # checkpoints from before it was kept lack it
        self._partial = state.get("partial")
        self._meta = dict(state.get("meta_batches") or {})
        if self.extension is not None and "extension" in state:
            self.extension.load_state_dict(state["extension"])
        for name, average in (("ema", self.ema), ("swa", self.swa)):
            if average is not None and name in state:
                average.load_state_dict(state[name])
            elif average is not None:  # a checkpoint without the average: it starts from the weights resumed
                average.reset(self.model)
        self._call("on_resume")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])


@contextlib.contextmanager
def _stop_signals(trainer: Trainer) -> Iterator[None]:
    """SIGINT and SIGTERM ask ``trainer`` to stop after the current step; a second SIGINT stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def ask(signum: int, frame: Any) -> None:
        if trainer._stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.request_stop()
        if dist.is_main():  # under torchrun every process gets the signal; one line says it
            tqdm.write(
                f"{signal.Signals(signum).name}: stopping after this step and saving a resumable checkpoint "
                f"(Ctrl-C again to stop at once)"
            )

    previous = {sig: signal.signal(sig, ask) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _task_gradients(
    losses: Sequence[Tensor], inputs: Sequence[Tensor], owned: Sequence[Tensor] = ()
) -> Tuple[Tensor, List[Tuple[Optional[Tensor], ...]]]:
    """Row t of the (T, D) float32 matrix: the flattened gradient of ``losses[t]`` w.r.t. ``inputs`` (zeros where
    unused); and each task's gradients w.r.t. ``owned`` (task-owned parameters, None where unused), from the same
    backward pass, so that no head is differentiated twice."""
    rows, owned_grads = [], []
    last = len(losses) - 1
    for t in range(last + 1):
        grads = torch.autograd.grad(losses[t], [*inputs, *owned], retain_graph=t < last, allow_unused=True)
        rows.append(
            torch.cat(
                [(g if g is not None else torch.zeros_like(x)).reshape(-1).float() for g, x in zip(grads, inputs)]
            )
        )
        owned_grads.append(grads[len(inputs) :])
    return torch.stack(rows), owned_grads


def updates_per_epoch(batches: int, samples: int = 1, accumulate: int = 1) -> int:
    """Optimizer updates in an epoch of ``batches`` training batches: one per ``samples`` batches of a multi-batch
    weighting (the rest left out), or one per ``accumulate`` batches (the last group may be shorter)."""
    return -(-batches // accumulate) if accumulate > 1 else batches // samples


def _check_accumulate(options: TrainerOptions, weighting: Weighting, extension: Optional[StepExtension]) -> None:
    """Refuse ``train.accumulate`` > 1 with a weighting whose update is no affine function of the task losses fixed
    within an update, and ``data.mix`` or ``train.accumulate`` with a step extension, in one line each."""
    if extension is not None and (options.mix is not None or options.accumulate > 1):
        key = "data.mix" if options.mix is not None else "train.accumulate"
        raise UserError(
            f"{key} is not supported with a step extension (a continual learner's penalty, replay or projection acts "
            f"on each step's own batch and labels); remove {key}"
        )
    if options.accumulate > 1 and not weighting.accumulable:
        raise UserError(f"train.accumulate={options.accumulate} {accumulate_refusal(weighting)}")


def accumulate_refusal(weighting: Weighting) -> str:
    """Why ``weighting`` cannot accumulate gradients over batches, completing "train.accumulate=N ..."."""
    name = type(weighting).__name__
    if weighting.gradient_level:
        why = "balances each batch's task gradients"
    elif weighting.bilevel:
        why = "takes a meta step before each batch"
    else:
        why = "weights the losses by each step's own losses or gradients, or draws its weights anew"
    return (
        f"sums the gradients of several batches into one update, which equals one larger batch only for a weighting "
        f"whose total is a fixed affine function of the task losses; {name} {why}; use weighting.name=equal, static, "
        f"uncertainty or dwa, or train.accumulate=1"
    )


def _accumulated(batches: Iterator[Any], size: int, count: int) -> Iterator[List[Any]]:
    """The next ``count`` batches in lists of ``size`` consecutive ones, the last list shorter when ``size`` does not
    divide ``count``."""
    while count > 0:
        take = min(size, count)
        yield [next(batches) for _ in range(take)]
        count -= take


def _grouped(batches: Iterator[Any], samples: int, count: int) -> Iterator[List[Any]]:
    """The next ``count`` lists of ``samples`` consecutive batches (no batch beyond them is loaded)."""
    for _ in range(count):
        yield [next(batches) for _ in range(samples)]


def _nonfinite_rows(grads: Tensor, owned_grads: List[Tuple[Optional[Tensor], ...]]) -> Tensor:
    """(T,) bool: task t's gradient (shared row or any of its own parameters' gradients) holds a nan or inf."""
    bad = ~torch.isfinite(grads).all(1)
    for t, per_task in enumerate(owned_grads):
        for g in per_task:
            if g is not None:
                bad[t] |= ~torch.isfinite(g).all()
    return bad


def _set_owned_grads(owned: Sequence[nn.Parameter], per_task: List[Tuple[Optional[Tensor], ...]], w: Tensor) -> None:
    """Task-owned parameters get the gradient of ``sum_t w_t * loss_t``."""
    w = w.detach()
    for i, p in enumerate(owned):
        total = None
        for t, grads in enumerate(per_task):
            if grads[i] is not None:
                g = w[t].to(grads[i].dtype) * grads[i]
                total = g if total is None else total + g
        p.grad = total


def _default_weighting(tasks: Mapping[str, Task]) -> Weighting:

    return build_weighting("static", list(tasks), [t.weight for t in tasks.values()])


def _postfix(result: Mapping[str, Any]) -> Dict[str, str]:
    out = {"loss": f"{result['loss']:.4f}"}
    if "acc" in result:
        out["acc"] = f"{result['acc']:.3f}"
    return out


_Meter = Meter  # its name before it had a module of its own
