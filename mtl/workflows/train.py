"""Build a run from a config and execute it: data, model, optimizer, hooks, run directory, summary."""

from __future__ import annotations

import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mtl.build.data import data_name
from mtl.build.experiment import (
    Experiment,
    _delta_m_fn,
    _speed_up,
    build_experiment,
    build_monitor,
)
from mtl.build.tasks import run_targets
from mtl.build.training import build_hooks, build_trainer, config_hooks
from mtl.config.load import build_config, config_to_dict, dump_config, load_config
from mtl.config.schema import Config
from mtl.core import distributed as dist
from mtl.core.checkpoint import atomic_write, load_checkpoint, save_json, writing
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules
from mtl.core.rundir import (
    RunLock,
    check_not_in_use,
    lock_run_dir,
    make_run_dir,
    no_checkpoint_yet,
    resume_hint,
)
from mtl.core.runtime import memory_mark, training_memory
from mtl.data.holdout import val_text
from mtl.engine.bn_recompute import bn_recompute_result
from mtl.engine.budget import Budget
from mtl.engine.hooks import flat_row, phase_text
from mtl.engine.trainer import Hook, Trainer, updates_per_epoch
from mtl.tasks.base import Task


def new_run_dir(cfg: Config) -> Path:
    """A new ``<out_dir>/<name>/<timestamp>[-<i>]``, created by process 0 (under torchrun every process gets its
    name). Creation is atomic: two runs started at the same moment never share a directory."""
    base = Path(cfg.out_dir) / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    made = dist.on_main(lambda: str(make_run_dir(base)))
    return Path(dist.broadcast_object(made))


def run(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train one config into ``run_dir`` (new if None) and write its summary; returns the summary.

    Process 0 holds the run directory's lock (``rundir.lock_run_dir``) while it trains: a second process that
    would write the same run is refused.
    """
    started = time.perf_counter()
    exp = build_experiment(cfg)
    monitor, delta_m_fn = (
        build_monitor(cfg, exp.tasks),
        _delta_m_fn(cfg, exp.tasks),
    )  # refused before anything is written
    named = config_hooks(cfg)  # likewise
    fresh = run_dir is None
    run_dir = new_run_dir(cfg) if fresh else Path(run_dir)
    lock = dist.on_main(lambda: _open_run_dir(cfg, run_dir, fresh, resume))
    try:
        return _train(cfg, exp, run_dir, resume, quiet, monitor, delta_m_fn, named, started)
    finally:
        if lock is not None:
            lock.release()


def _open_run_dir(cfg: Config, run_dir: Path, fresh: bool, resume: bool) -> RunLock:
    """Lock the run directory and, unless resuming, write its config; a new directory that cannot get them is
    removed again."""
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = lock_run_dir(run_dir)
        if not resume:
            atomic_write(run_dir / "config.yaml", lambda tmp: dump_config(cfg, tmp))
        return lock
    except BaseException:
        if lock is not None:
            lock.release()
        if fresh:  # nothing of this run was written: leave no directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise


def _train(
    cfg: Config,
    exp: Experiment,
    run_dir: Path,
    resume: bool,
    quiet: bool,
    monitor: Callable[[Dict[str, Any]], float],
    delta_m_fn: Optional[Callable[[Dict[str, Any]], float]],
    named: Sequence[Hook],
    started: float,
) -> Dict[str, Any]:
    main_process = dist.is_main()  # under torchrun only process 0 writes
    model, loaders = _speed_up(cfg, exp)
    classes = {t: task.classes for t, task in exp.tasks.items()}
    meta = {
        "config": config_to_dict(cfg),
        "classes": classes,
        "encoder": cfg.model.encoder,
        "targets": run_targets(cfg, exp.tasks),
        "input_size": exp.input_size,
    }
    hooks = build_hooks(
        cfg,
        run_dir,
        classes=classes,
        meta=meta,
        encoder=exp.model.encoder,
        graph_model=exp.model,
        quiet=quiet,
        named=named,
    )
    trainer = build_trainer(
        cfg,
        model,
        exp.tasks,
        loaders,
        device=exp.device,
        generator=exp.generator,
        hooks=hooks,
        optimized=exp.model,
        weighting=exp.weighting,
        l2sp=exp.l2sp,
        quiet=quiet,
        grad_on=cfg.weighting.grad_on,
        monitor=monitor,
        delta_m=delta_m_fn,
        channels_last=exp.info["channels_last"],
        nonfinite=cfg.train.nonfinite,
    )
    if resume:
        trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    if not quiet and main_process:
        p = exp.info["params"]
        print(
            f"run {run_dir}  |  {cfg.model.encoder} on {data_name(cfg)}: {exp.info['train_size']} train / "
            f"{exp.info['val_size']} val"
            + (f" / {exp.info['test_size']} test" if "test_size" in exp.info else "")
            + f" images, {_task_text(exp.tasks)}  |  params {p['total']:,} "
            f"({p['trainable']:,} trainable)  |  device {exp.device}  |  data {exp.info['pipeline']}"
            + (f"  |  skipped {exp.info['skipped_images']} unreadable images" if exp.info["skipped_images"] else "")
            + f"  |  {budget_text(exp.info['budget'])}"
        )
    mark = memory_mark(exp.device)
    history = trainer.fit()
    memory = training_memory(exp.device, mark)
    bn = bn_recompute_result(hooks)
    recomputed = bool(bn and bn["delivered"])
    test = _evaluate_test(trainer, run_dir, recomputed) if "test" in trainer.loaders else None
    summary = _summary(cfg, run_dir, trainer, exp, history, time.perf_counter() - started)
    summary["memory"] = memory
    if test is not None:
        summary["test"] = test
    summary["processes"] = dist.world_size()
    if trainer.swa is not None:  # None: no epoch was averaged (training ended before swa.start_epoch)
        summary["swa"] = trainer.swa_result
    if cfg.train.bn_recompute:  # None: no best epoch
        summary["bn_recompute"] = bn
    if main_process:
        if test is not None:
            _log_test(run_dir, test, summary)
        save_json(summary, run_dir / "summary.json", lambda: resume_hint(run_dir))
        if not quiet:
            print(end_line(summary, cfg.train.monitor))
    dist.barrier()  # a next stage reads this run's checkpoints
    return summary


def end_line(summary: Mapping[str, Any], monitor: str) -> str:
    """One line at a run's end: the best epoch (by ``train.monitor``) and its validation metrics, the final ones, the
    test split's metrics of both when the run has one, and where the run was written."""
    best, final = summary["best"], summary["final"] or {}
    phase = "val" if best.get("val") else "train"
    text = f"done: best epoch {best['epoch']} of {summary['epochs']} (train.monitor {monitor})"
    if best.get(phase):
        text += f": {phase} {phase_text(best[phase])}"
    if best.get("val_ema"):
        text += f", val_ema {phase_text(best['val_ema'])}"
    if final.get(phase) and final.get("epoch") != best["epoch"]:
        text += f"  |  final epoch {final['epoch']}: {phase} {phase_text(final[phase])}"
    swa = summary.get("swa") or {}
    if swa.get("val"):
        chosen = "delivered as best.pt" if swa["delivered"] else "the best epoch stays best.pt"
        text += f"  |  swa (epochs {swa['epochs'][0]}-{swa['epochs'][-1]}): val {phase_text(swa['val'])}, {chosen}"
    bn = summary.get("bn_recompute") or {}
    if bn.get("val"):
        chosen = "delivered as best.pt" if bn["delivered"] else "best.pt keeps the epoch's"
        text += f"  |  BatchNorm statistics recomputed (epoch {bn['epoch']}): val {phase_text(bn['val'])}, {chosen}"
    test = summary.get("test") or {}
    if test.get("best"):
        text += f"  |  test (best epoch): {phase_text(test['best'])}"
    if test.get("last") and final.get("epoch") != best["epoch"]:
        text += f"  |  test (final epoch): {phase_text(test['last'])}"
    return text + f"  |  written to {summary['run_dir']}"


def _evaluate_test(trainer: Trainer, run_dir: Path, recomputed: bool = False) -> Dict[str, Any]:
    """The test split's metrics, through the trainer's evaluation phase (under torchrun each process scores its
    share), of the final weights ("last"; with train.ema the final EMA weights) and of best.pt, the weights the run
    delivers ("best": the best-on-validation epoch, or the SWA weights when they validated better, or with
    ``recomputed`` its weights with recomputed BatchNorm statistics; None without a best epoch). Both are read from
    the checkpoints process 0 wrote; the model keeps the best weights afterwards."""
    dist.barrier()
    checkpoints = run_dir / "checkpoints"
    state = load_checkpoint(checkpoints / "last.pt")
    trainer.model.load_state_dict(state["ema"]["model"] if "ema" in state else state["model"])
    last = trainer.run_phase("test")
    best = None
    averaged = "ema" in state or bool((trainer.swa_result or {}).get("delivered")) or recomputed
    if trainer.best["epoch"] == trainer.epoch and not averaged:
        best = last
    elif trainer.best["epoch"] is not None:
        trainer.model.load_state_dict(load_checkpoint(checkpoints / "best.pt")["model"])
        best = trainer.run_phase("test")
    return {"best": best, "last": last}


def _log_test(run_dir: Path, test: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
    """``test/best/...`` and ``test/last/...`` TensorBoard scalars (e.g. ``test/best/label/acc``) at the epoch each
    set of weights comes from, in an events file of their own in the run directory."""
    from torch.utils.tensorboard import SummaryWriter

    steps = {"best": summary["best"]["epoch"], "last": (summary["final"] or {}).get("epoch")}
    with writing(run_dir / "events.out.tfevents.*.test", lambda: resume_hint(run_dir)):
        writer = SummaryWriter(log_dir=str(run_dir), filename_suffix=".test")
        try:
            for which, phase in test.items():
                for key, value in flat_row(phase or {}).items():
                    writer.add_scalar(
                        f"test/{which}/{key.removeprefix('tasks.').replace('.', '/')}", value, steps[which]
                    )
            writer.flush()
        finally:
            writer.close()


def budget_text(budget: Mapping[str, Any]) -> str:
    """The run line's budget (``exp.info["budget"]``): ``budget 1000 steps = 143 epochs of 7 steps (the last 6;
    train.epochs not used), validation every 5 epochs and at the end``."""
    b = Budget(budget["epochs"], budget["steps_per_epoch"], budget["steps"] if budget["unit"] == "steps" else None)
    every = budget["val_every"]
    return f"budget {b.text()}" + (f", validation every {every} epochs and at the end" if every > 1 else "")


def _task_text(tasks: Mapping[str, Task]) -> str:
    if len(tasks) == 1:
        task = next(iter(tasks.values()))
        return f"{len(task.classes)} classes" if task.classes else task.type_name
    return f"{len(tasks)} tasks (" + ", ".join(f"{t}: {task.type_name}" for t, task in tasks.items()) + ")"


def _summary(
    cfg: Config, run_dir: Path, trainer: Trainer, exp: Experiment, history: List[Dict[str, Any]], total_s: float
) -> Dict[str, Any]:
    epoch_s = [m["time_s"] for m in history]
    best = history[trainer.best["epoch"] - 1] if trainer.best["epoch"] else {}
    return {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "weighting": cfg.weighting.name if len(exp.tasks) > 1 else "",
        "tasks": {
            t: {"type": task.type_name, "primary": task.primary, "directions": dict(task.metric_directions)}
            for t, task in exp.tasks.items()
        },
        "epochs": trainer.epoch,
        "protocol": {
            "select": "val",
            "val": val_text(cfg.data.val_split, cfg.data.train_split, cfg.data.split_seed),
            "test": cfg.data.test_split,
        },
        "best": {"epoch": trainer.best["epoch"], "val": best.get("val"), "train": best.get("train"), **_ema(best)},
        "final": {
            "epoch": history[-1]["epoch"],
            "val": history[-1].get("val"),
            "train": history[-1]["train"],
            **_ema(history[-1]),
        }
        if history
        else None,
        "steps_per_epoch": updates_per_epoch(len(exp.loaders["train"]), exp.weighting.samples, cfg.train.accumulate),
        "steps": trainer.steps_done,  # training steps made (the budget: "budget")
        "skipped_steps": trainer.skipped_steps,
        "time": {
            "total_s": total_s,
            "epoch_s": epoch_s,
            "mean_epoch_s": sum(epoch_s) / max(len(epoch_s), 1),
            "train_epoch_s": [m["time_train_s"] for m in history],
            "mean_train_epoch_s": sum(m["time_train_s"] for m in history) / max(len(history), 1),
        },
        **exp.info,
    }


def _ema(epoch: Mapping[str, Any]) -> Dict[str, Any]:
    """An epoch's validation metrics of the EMA weights (train.ema), as ``{"val_ema": ...}``, or nothing."""
    return {"val_ema": epoch["val_ema"]} if "val_ema" in epoch else {}


# --------------------------------------------------------------------------- stages


def resume_run(run_dir: str) -> Dict[str, Any]:
    """Continue a run from ``<run_dir>/checkpoints/last.pt`` with its saved config."""

    d = Path(run_dir)
    if not (d / "config.yaml").is_file():
        raise UserError(f"cannot resume {d}: it needs config.yaml and checkpoints/last.pt (is it a run directory?)")
    dist.on_main(lambda: check_not_in_use(d))  # checked again, by taking the lock, before anything is written
    if not (d / "checkpoints" / "last.pt").is_file():
        raise UserError(no_checkpoint_yet(d))
    raw, sources = load_config(d / "config.yaml")
    import_config_modules(raw)
    cfg = build_config(raw, sources)
    check_resumable(d, cfg, load_checkpoint(d / "checkpoints" / "last.pt"))
    return run(cfg, d, resume=True)


_TRAINING_STATE = ("model", "optimizer", "scheduler", "epoch", "global_step", "best", "history", "rng")
# the settings that decide the model's parameters and the optimizer's state: a checkpoint resumes only into the same
_STRUCTURE = (
    "model.encoder",
    "model.encoder_options",
    "model.arch",
    "model.freeze",
    "tasks",
    "optim.name",
    "optim.weight_decay",
    "optim.no_decay_norm_bias",
    "optim.lr_mult",
    "optim.layer_decay",
    "weighting.name",
    "weighting.options",
    "train.unfreeze",
    "train.ema",
    "train.swa",
)
_TASK_STRUCTURE = ("type", "target", "num_classes", "head")
_ABSENT = object()


def check_resumable(run_dir: Path, cfg: Config, state: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, a ``last.pt`` that is no training state or was saved with another
    architecture or optimizer than ``cfg`` (an edited config.yaml, or a checkpoint copied from another run)."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    lacking = [k for k in _TRAINING_STATE if k not in state]
    if lacking:
        raise UserError(
            f"cannot resume {run_dir}: {ckpt} is not a training checkpoint (it lacks {', '.join(lacking)}; "
            f"a best.pt or a weights file?); give the run's own last.pt, or start a new run with "
            f"mtl train {run_dir / 'config.yaml'}"
        )
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        return
    now = config_to_dict(cfg)
    for key in _STRUCTURE:
        found = _difference(_structure(saved, key), _structure(now, key), key)
        if found is not None:
            where, old, new = found
            raise UserError(
                f"cannot resume {run_dir}: config.yaml has {where}: {_shown(new)} but {ckpt} was saved "
                f"with {where}: {_shown(old)}; put that value back in config.yaml, or start a new run "
                f"with mtl train {run_dir / 'config.yaml'}"
            )


def _structure(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (tasks: only what shapes each task's head), or _ABSENT."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    if key == "tasks" and isinstance(node, Mapping):
        return {
            t: {k: v for k, v in tc.items() if k in _TASK_STRUCTURE} if isinstance(tc, Mapping) else tc
            for t, tc in node.items()
        }
    return node


def _difference(old: Any, new: Any, key: str) -> Optional[Tuple[str, Any, Any]]:
    """The first dotted key below ``key`` where ``old`` and ``new`` differ; keys that ``old`` lacks (a checkpoint
    from an older mtl) do not count."""
    if old is _ABSENT:
        return None
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in dict.fromkeys([*old, *new]):
            found = _difference(old.get(k, _ABSENT), new.get(k, _ABSENT), f"{key}.{k}")
            if found is not None:
                return found
        return None
    return None if old == new else (key, old, new)


def _shown(value: Any) -> str:
    text = "(not set)" if value is _ABSENT else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    text = text.removesuffix("\n...").removesuffix(" ...").strip()
    return text if len(text) <= 80 else text[:77] + "..."
