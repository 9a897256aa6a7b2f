"""Trainer hooks: unfreezing, checkpoints, metrics.jsonl, console lines, TensorBoard, early stopping; and ``HOOKS``,
the hooks a config may name in ``train.hooks``."""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Set

import torch
from torch import nn
from tqdm.auto import tqdm

from mtl.config.schema import OptimCfg, UnfreezeCfg
from mtl.core import distributed as dist
from mtl.core.checkpoint import atomic_write, load_checkpoint, save_checkpoint, writing
from mtl.core.errors import UserError
from mtl.core.registry import Registry
from mtl.core.rundir import resume_hint
from mtl.core.runtime import evaluating
from mtl.engine.evaluate import confusion_tasks
from mtl.engine.optim import add_param_group, param_groups
from mtl.engine.trainer import Hook, Trainer
from mtl.engine.visualize import confusion_image, prediction_grid
from mtl.models.freezing import set_trainable
from mtl.models.layer_depth import encoder_scales

# hooks that train.hooks may name: a Hook subclass or a function returning a Hook, called with the entry's options
# as keyword arguments. mtl's own writers (below) need the run directory and are added by the build layer instead.
HOOKS = Registry("hook")


@HOOKS.register("early_stopping")
class EarlyStoppingHook(Hook):
    """Ends training once the score that picks the best epoch (``train.monitor``) has not risen by more than
    ``min_delta`` above its best for ``patience`` validated epochs (with ``train.val_every`` N, patience counts
    validations, N epochs apart). The best checkpoint is restored as after the last epoch. It reads the epoch history
    and keeps no state, so a resumed run that had already stopped ends at once."""

    def __init__(self, patience: int = 5, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise UserError(f"hook 'early_stopping': patience must be an integer >= 1, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or not 0 <= min_delta < math.inf:
            raise UserError(f"hook 'early_stopping': min_delta must be a number >= 0, got {min_delta!r}")
        self.patience, self.min_delta = patience, float(min_delta)

    def stale_epochs(self, trainer: Trainer) -> int:
        """Validated epochs since the score last rose by more than ``min_delta`` above the best before it."""
        best, stale = -math.inf, 0
        for m in trainer.history:
            if m["score"] is None:  # not validated (train.val_every)
                continue
            if m["score"] > best + self.min_delta:
                best, stale = m["score"], 0
            else:
                stale += 1
        return stale

    def _check(self, trainer: Trainer) -> None:
        if trainer.epoch < trainer.epochs and self.stale_epochs(trainer) >= self.patience:
            trainer.end_training()
            if dist.is_main():
                by = f" by more than {self.min_delta:g}" if self.min_delta else ""
                tqdm.write(
                    f"early stopping after epoch {trainer.epoch}: the score has not risen{by} for "
                    f"{self.patience} validated epoch{'s' if self.patience > 1 else ''} (best epoch "
                    f"{trainer.best['epoch']})"
                )

    def on_resume(self, trainer: Trainer) -> None:
        self._check(trainer)

    def after_epoch(self, trainer: Trainer, metrics: Dict[str, Any]) -> None:
        self._check(trainer)


class UnfreezeHook(Hook):
    """At the start of each configured epoch, or before each configured training step (``step`` s: once s updates
    are made, between update s - 1 and update s, counted from 0), unfreeze modules and add them to the optimizer
    (with their ``optim.layer_decay`` scale)."""

    def __init__(
        self, encoder: nn.Module, events: Sequence[UnfreezeCfg], optim_cfg: OptimCfg, prefix: str = "encoder"
    ) -> None:
        self.encoder, self.events, self.optim_cfg, self.prefix = encoder, list(events), optim_cfg, prefix
        self.applied: set = set()

    def _apply(self, trainer: Trainer, event: UnfreezeCfg) -> None:
        newly = {id(p) for p in set_trainable(self.encoder, event.modules)}
        named = [(f"{self.prefix}.{n}", p) for n, p in self.encoder.named_parameters() if id(p) in newly]
        decay = self.optim_cfg.layer_decay
        scales = encoder_scales(self.encoder, decay) if decay is not None else None
        add_param_group(
            trainer.optimizer, trainer.scheduler, param_groups(named, self.optim_cfg, event.lr_mult, scales)
        )
        trainer.model.train(trainer.model.training)  # re-derive which norm layers stay frozen

    def before_epoch(self, trainer: Trainer) -> None:
        for i, event in enumerate(self.events):
            if event.epoch == trainer.epoch and i not in self.applied:
                self._apply(trainer, event)
                self.applied.add(i)
                tqdm.write(f"epoch {trainer.epoch + 1}: unfroze {', '.join(event.modules)} (lr x{event.lr_mult:g})")

    def before_step(self, trainer: Trainer) -> None:
        for i, event in enumerate(self.events):
            if event.step == trainer.steps_done and i not in self.applied:
                self._apply(trainer, event)
                self.applied.add(i)
                tqdm.write(f"after {event.step} steps: unfroze {', '.join(event.modules)} (lr x{event.lr_mult:g})")

    def on_resume(self, trainer: Trainer) -> None:
        """Apply again, in the order they happened (so that the optimizer's groups line up with the checkpoint's),
        the events before the point the run resumes at."""
        mid_epoch = trainer._partial is not None  # the interrupted epoch had already unfrozen its modules
        done = [
            i
            for i, event in enumerate(self.events)
            if (event.step is not None and event.step < trainer.steps_done)
            or (
                event.epoch is not None
                and (event.epoch < trainer.epoch or (mid_epoch and event.epoch == trainer.epoch))
            )
        ]
        per_epoch = trainer.steps_per_epoch() if any(self.events[i].step is not None for i in done) else 1
        done.sort(key=lambda i: (self.events[i].at(per_epoch), self.events[i].step is not None, i))  # as they ran
        for i in done:
            self._apply(trainer, self.events[i])
            self.applied.add(i)


class CheckpointHook(Hook):
    """``checkpoints/last.pt`` (full state) every epoch, ``best.pt`` (model) on a new best; best restored at the end.

    ``keep_top_k`` > 1 also keeps the k best epochs by score as ``top/epoch_NNNN.pt`` (ties: the earlier epoch; an
    epoch whose score is not a number is never among them): read from the epoch history, so a resumed run keeps the
    same ones. ``every`` n epochs, ``epoch_NNNN.pt`` as well. These hold the model, epoch and metrics, like best.pt.

    With ``train.ema`` their "model" is the EMA weights (what selects the epoch, and what best.pt delivers) and
    "model_raw" the trained ones. With ``train.swa``, ``swa.pt`` holds the averaged weights at the end, and becomes
    best.pt as well when it validates better than the best epoch (``trainer.swa_result["delivered"]``).
    """

    def __init__(
        self, run_dir: Path, meta: Mapping[str, Any], keep_top_k: int = 1, every: Optional[int] = None
    ) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.meta = dict(meta)
        self.keep_top_k, self.every = keep_top_k, every
        self.then = functools.partial(resume_hint, Path(run_dir))  # what to do after a full disk

    def after_epoch(self, trainer: Trainer, metrics: Dict[str, Any]) -> None:
        weights = {"model": trainer.model.state_dict(), "epoch": trainer.epoch, "metrics": metrics, **self.meta}
        ema = getattr(trainer, "ema", None)
        if ema is not None:
            weights.update(model=ema.module.state_dict(), model_raw=weights["model"])
        if metrics["is_best"]:
            save_checkpoint(weights, self.dir / "best.pt", self.then)
        if self.keep_top_k > 1:
            self._keep_top(trainer, weights)
        if self.every and trainer.epoch % self.every == 0:
            save_checkpoint(weights, self.dir / f"epoch_{trainer.epoch:04d}.pt", self.then)
        save_checkpoint({**trainer.state_dict(), **self.meta}, self.dir / "last.pt", self.then)

    def _keep_top(self, trainer: Trainer, weights: Dict[str, Any]) -> None:
        """Save this epoch when it is among the k best, then delete the files of epochs that no longer are."""
        wanted = top_epochs(trainer.history, self.keep_top_k)
        top = self.dir / "top"
        if trainer.epoch in wanted:
            save_checkpoint(weights, top / f"epoch_{trainer.epoch:04d}.pt", self.then)
        for path in top.glob("epoch_*.pt"):
            if int(path.stem.split("_")[1]) not in wanted:
                path.unlink()

    def on_interrupt(self, trainer: Trainer, state: Dict[str, Any]) -> None:
        save_checkpoint({**state, **self.meta}, self.dir / "last.pt", self.then)
        step = state["partial"]["step"]
        tqdm.write(
            f"saved {self.dir / 'last.pt'} (epoch {trainer.epoch + 1}, step {step}); continue with: "
            f"mtl train --resume {self.dir.parent}"
        )

    def after_train(self, trainer: Trainer) -> None:
        best = self.dir / "best.pt"
        swa = getattr(trainer, "swa_result", None)
        if swa is not None:
            metrics = {"epoch": trainer.epoch, "val": swa["val"], "score": swa["score"], "swa": True}
            weights = {"model": trainer.swa.module.state_dict(), "epoch": trainer.epoch, "metrics": metrics}
            weights.update(swa={"epochs": swa["epochs"], "delivered": swa["delivered"]}, **self.meta)
            save_checkpoint(weights, self.dir / "swa.pt", self.then)
            if swa["delivered"]:
                save_checkpoint(weights, best, self.then)
        if best.exists():
            trainer.model.load_state_dict(load_checkpoint(best)["model"])


def top_epochs(history: Sequence[Mapping[str, Any]], k: int) -> Set[int]:
    """The epochs (1-based) of the ``k`` highest finite scores in ``history``; ties go to the earlier epoch."""
    scored = [(m["score"], m["epoch"]) for m in history if m["score"] is not None and math.isfinite(m["score"])]
    return {epoch for _, epoch in sorted(scored, key=lambda se: (-se[0], se[1]))[:k]}


class MetricsFileHook(Hook):
    """One JSON line per epoch in ``metrics.jsonl``; on resume, later lines are dropped first. A write that fails
    (full disk) is undone, so the file never ends in half a line. The same epochs as one flat row each in
    ``metrics.csv`` (for spreadsheets; columns such as ``val.tasks.label.acc``, ``lr.0``), rewritten whole and
    atomically every epoch from the trainer's history."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.csv = Path(run_dir) / "metrics.csv"
        self.then = functools.partial(resume_hint, Path(run_dir))

    def on_resume(self, trainer: Trainer) -> None:
        if self.path.exists():
            lines = self.path.read_bytes().splitlines(keepends=True)[: trainer.epoch]
            with writing(self.path, self.then):
                os.truncate(self.path, sum(len(line) for line in lines))  # shrinking needs no free space

    def after_epoch(self, trainer: Trainer, metrics: Dict[str, Any]) -> None:
        line = memoryview((json.dumps(metrics) + "\n").encode())
        with writing(self.path, self.then):
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(fd).st_size
                try:
                    while line:
                        line = line[os.write(fd, line) :]
                except BaseException:
                    os.ftruncate(fd, size)
                    raise
            finally:
                os.close(fd)
        rows = [flat_row(m) for m in trainer.history]
        columns = list(dict.fromkeys(c for row in rows for c in row))

        def write_csv(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=columns)
                writer.writeheader()
                writer.writerows(rows)

        atomic_write(self.csv, write_csv, self.then)


def flat_row(metrics: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """An epoch's nested metrics as one flat row: ``{"val": {"tasks": {"label": {"acc": x}}}}`` gives
    ``{"val.tasks.label.acc": x}``; lists are numbered (``lr.0``)."""
    row: Dict[str, Any] = {}
    items = metrics.items() if isinstance(metrics, Mapping) else enumerate(metrics)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (Mapping, list, tuple)):
            row.update(flat_row(value, f"{name}."))
        else:
            row[name] = value
    return row


class ConsoleHook(Hook):
    """A one-line summary per epoch."""

    def after_epoch(self, trainer: Trainer, m: Dict[str, Any]) -> None:
        line = f"epoch {m['epoch']:>3}/{trainer.epochs}  train {phase_text(m['train'])}"
        if "val" in m:
            line += f"  |  val {phase_text(m['val'])}"
        elif "val" in trainer.loaders:
            line += f"  |  not validated (train.val_every {trainer.val_every})"
        if "val_ema" in m:
            line += f"  |  val_ema {phase_text(m['val_ema'])}"
        line += f"  |  {m['time_s']:.1f}s  lr {m['lr'][0]:.2e}" + ("  *best*" if m["is_best"] else "")
        tqdm.write(line)


def phase_text(r: Mapping[str, Any]) -> str:
    """``loss 0.41 acc 0.87`` for classifiers; with several tasks each task's first metric too."""
    text = f"loss {r['loss']:.4f}"
    if "acc" in r:
        text += f" acc {r['acc']:.4f}"
    if len(r["tasks"]) > 1 or "acc" not in r:
        for task, values in r["tasks"].items():
            first = next((k for k in values if k != "loss"), None)
            if first is not None:
                text += f" {task}.{first} {values[first]:.4f}"
    if "delta_m" in r:
        text += f" Δm {r['delta_m']:+.2f}%"
    return text


def _quiet_event_writer_threads() -> None:
    """TensorBoard's writer thread prints a traceback when a write fails (full disk, read-only folder); the same
    error reaches the training thread at its next write, as one UserError line (``_writes_events``). Leave out the
    thread's traceback."""
    previous = threading.excepthook
    if getattr(previous, "mtl_quiet", False):
        return

    def hook(args: Any) -> None:
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, OSError):
            return
        previous(args)

    hook.mtl_quiet = True  # type: ignore[attr-defined]
    threading.excepthook = hook


def _writes_events(method: Callable) -> Callable:
    """A TensorBoardHook method that writes events: a full disk or a read-only folder is one UserError line."""

    @functools.wraps(method)
    def wrapper(self: "TensorBoardHook", *args: Any) -> Any:
        with writing(self.events, self.then):
            return method(self, *args)

    return wrapper


class TensorBoardHook(Hook):
    """Each epoch (x = the epoch number, for every scalar): loss and accuracy per phase, every task's metrics under
    their own names (``<task>/<metric>/<phase>``), the task weights (their mean over the epoch's steps), lr per
    group, a grid of validation predictions and, per dense task, input, ground truth and prediction side by side.
    At the end: validation confusion matrices of the best model (kept from the validation pass that selected it),
    and ``hparams`` with the best and final metrics (``hparam_metrics``), so that TensorBoard's HParams tab lines
    runs up."""

    def __init__(
        self,
        run_dir: Path,
        *,
        hparams: Mapping[str, Any],
        classes: Mapping[str, List[str]],
        mean: Sequence[float],
        std: Sequence[float],
        n_images: int = 16,
        graph_model: Optional[nn.Module] = None,
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        _quiet_event_writer_threads()
        self.then = functools.partial(resume_hint, Path(run_dir))
        self.events = Path(run_dir) / "events.out.tfevents.*"
        with writing(self.events, self.then):
            self.writer = SummaryWriter(log_dir=str(run_dir))
        self.events = Path(getattr(self.writer.file_writer.event_writer, "_file_name", self.events))
        self.hparams, self.classes = dict(hparams), dict(classes)
        self.mean, self.std, self.n_images = torch.tensor(mean), torch.tensor(std), n_images
        self.n_overlays = min(n_images, 4)  # dense tasks: this many validation images per epoch, one row each
        self._images: Optional[torch.Tensor] = None
        self.graph_model = graph_model  # the full model (trainer.model may be heads on cached features)

    @_writes_events
    def before_train(self, trainer: Trainer) -> None:
        if self.graph_model is not None and trainer.epoch == 0:
            self._log_graph(trainer)

    @torch.no_grad()
    def _log_graph(self, trainer: Trainer) -> None:
        """The model graph (TensorBoard's Graphs tab), traced on one validation image in eval mode."""
        split = "val" if "val" in trainer.loaders else "train"
        self._load_images(trainer.loaders[split])
        model = self.graph_model
        try:
            with warnings.catch_warnings():  # the tracer's notes on Python control flow concern only this picture
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                warnings.filterwarnings(
                    "ignore", message=".*torch.jit.trace", category=FutureWarning
                )  # add_graph's tracer
                with evaluating(model):  # tracing runs a forward pass: keep batch-norm statistics
                    self.writer.add_graph(model, self._images[:1].to(trainer.device), use_strict_trace=False)
        except Exception as e:  # tracing is best-effort: some models use Python control flow it cannot follow
            tqdm.write(
                f"warning: model graph not written to TensorBoard ({type(e).__name__}: {str(e).splitlines()[0]})"
            )

    def _load_images(self, loader: Any) -> None:
        """The first validation images and targets, straight from the data set (a loader iterator would consume
        the global RNG)."""
        if self._images is None:
            n = min(max(self.n_images, 1), len(loader.dataset))
            batch = loader.collate_fn([loader.dataset[i] for i in range(n)])
            self._images = batch["image"][: max(self.n_images, 1)]
            self._targets = {t: y[: len(self._images)] for t, y in batch["targets"].items()}

    @_writes_events
    def after_epoch(self, trainer: Trainer, m: Dict[str, Any]) -> None:
        step = m["epoch"]
        for phase in ("train", "val", "val_ema"):
            if phase not in m:
                continue
            self.writer.add_scalar(f"loss/{phase}", m[phase]["loss"], step)
            if "acc" in m[phase]:
                self.writer.add_scalar(f"acc/{phase}", m[phase]["acc"], step)
            if "delta_m" in m[phase]:
                self.writer.add_scalar(f"delta_m/{phase}", m[phase]["delta_m"], step)
            for task, values in m[phase]["tasks"].items():
                for metric, value in values.items():
                    self.writer.add_scalar(f"{task}/{metric}/{phase}", value, step)
        for task, w in m.get("weights", {}).items():
            self.writer.add_scalar(f"weight/{task}", w, step)
        for i, group in enumerate(trainer.optimizer.param_groups):
            self.writer.add_scalar(f"lr/group{i}", group["lr"], step)
        self.writer.add_scalar("time/epoch_s", m["time_s"], step)
        if self.n_images and "val" in m:  # epochs that validate (train.val_every)
            self._log_val_images(trainer, step)
        self.writer.flush()

    @staticmethod
    def _grid_task(trainer: Trainer) -> Optional[str]:
        """The first task with image-level class predictions (the grid labels images with its classes)."""
        return next((t for t, task in trainer.tasks.items() if task.confusion), None)

    @torch.no_grad()
    def _log_val_images(self, trainer: Trainer, step: int) -> None:
        """The prediction grid of the first validation images and, per dense task, overlays of a few of them."""

        grid_task = self._grid_task(trainer)
        dense = [t for t, task in trainer.tasks.items() if task.dense]
        if grid_task is None and not dense:
            return
        self._load_images(trainer.loaders["val"])
        if grid_task not in self._targets:  # a multi-input run's grid shows its first task's images only
            grid_task = None
        dense = [t for t in dense if t in self._targets]
        with evaluating(trainer.model), trainer.autocast():
            outputs = trainer.model(self._images.to(trainer.device))
        images = (self._images.float() * self.std[:, None, None] + self.mean[:, None, None]).clamp(0, 1)
        if grid_task is not None:
            task = trainer.tasks[grid_task]
            preds = task.predict(outputs[grid_task].float()).cpu()
            self.writer.add_image(
                "val/predictions",
                prediction_grid(images, preds, self._targets[grid_task], self.classes.get(grid_task, [])),
                step,
            )
        n = min(self.n_overlays, len(images))
        for t in dense:
            picture = trainer.tasks[t].overlay(outputs[t][:n], self._targets[t][:n], images[:n])
            self.writer.add_image(f"val/overlay_{t}", picture, step)

    def _log_confusions(self, trainer: Trainer) -> None:
        """Confusion matrices of the best model on the validation set, one image per classification task: those the
        trainer kept from the validation pass that selected it (``Trainer.best_confusion``), with no pass of its own."""
        if "val" not in trainer.loaders or not confusion_tasks(trainer.tasks) or trainer.best["epoch"] is None:
            return
        swa = getattr(trainer, "swa_result", None) or {}
        if swa.get("delivered"):
            which = f"SWA of epochs {swa['epochs'][0]}-{swa['epochs'][-1]}"
        elif (getattr(trainer, "bn_recompute_result", None) or {}).get("delivered"):
            which = f"epoch {trainer.bn_recompute_result['epoch']} with recomputed BatchNorm statistics"
        else:
            which = f"best epoch {trainer.best['epoch']}"
        if not trainer.best_confusion:
            tqdm.write(
                f"note: no confusion matrix in TensorBoard: none was kept from the validation pass of the {which} "
                f"(a checkpoint written before mtl kept them); `mtl eval {Path(self.writer.log_dir)} --split val` "
                f"draws them"
            )
        for t, matrix in trainer.best_confusion.items():
            title = f"{t} (val, {which}): rows true, columns predicted"
            self.writer.add_image(
                f"val/confusion_{t}", confusion_image(matrix, self.classes.get(t, []), title), trainer.epoch
            )

    @_writes_events
    def after_train(self, trainer: Trainer) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._log_confusions(trainer)
        names, values = hparam_metrics(trainer.tasks, trainer.history, trainer.best["epoch"], "val" in trainer.loaders)
        # Written into this run's own directory (SummaryWriter.add_hparams would open a sub-run). The experiment
        # summary lists every name, also those this run has no value for (delta_m without a baseline): TensorBoard
        # takes the columns of its HParams table from one run's summary, so runs of the same tasks must list the same.
        for summary in hparams(_scalar_hparams(self.hparams), dict.fromkeys(names, 0.0)):
            self.writer.file_writer.add_summary(summary)
        for k, v in values.items():
            self.writer.add_scalar(k, v, trainer.epoch)
        self.writer.flush()  # raises a failed write here; close() alone would drop it
        self.writer.close()


def hparam_metrics(
    tasks: Mapping[str, Any], history: Sequence[Mapping[str, Any]], best_epoch: Optional[int], validated: bool
) -> tuple[List[str], Dict[str, float]]:
    """The HParams tab's metric columns of a run and their values: ``hparam/best_epoch`` (by ``train.monitor``),
    then for the best and the final epoch ``hparam/{best,final}/<task>.<metric>`` for every metric of every task
    (``loss`` included) and ``hparam/{best,final}/{loss,acc,delta_m}`` for the whole phase (``acc`` when every task
    has one). Values are validation metrics; a run without validation data names them ``hparam/{best,final}_train``.
    The names depend only on the tasks (and on whether there is validation data), never on the values: every column
    has one meaning, and runs of the same tasks have the same columns."""
    phase = "val" if validated else "train"
    reported = {
        t: ["loss", *(k for k in task.metric_directions if k != "loss" and k in (getattr(task, "report", None) or [k]))]
        for t, task in tasks.items()
    }
    overall = ["loss", "acc", "delta_m"] if all("acc" in m for m in reported.values()) else ["loss", "delta_m"]
    names, values = ["hparam/best_epoch"], {}
    if best_epoch is not None:
        values["hparam/best_epoch"] = float(best_epoch)
    epochs = {"best": history[best_epoch - 1] if best_epoch else None, "final": history[-1] if history else None}
    for kind, epoch in epochs.items():
        prefix = f"hparam/{kind}/" if validated else f"hparam/{kind}_train/"
        result = (epoch or {}).get(phase) or {}
        for key in overall:
            names.append(prefix + key)
            if key in result:
                values[prefix + key] = float(result[key])
        for t, metrics in reported.items():
            got = result.get("tasks", {}).get(t, {})
            for metric in [*metrics, *(k for k in got if k not in metrics)]:
                names.append(f"{prefix}{t}.{metric}")
                if metric in got:
                    values[f"{prefix}{t}.{metric}"] = float(got[metric])
    return names, values


def _scalar_hparams(hp: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in hp.items()}
