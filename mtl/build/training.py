"""What the trainer is given, from a config: its options and its hooks (mtl's own, then those ``train.hooks`` names)."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mtl.build.data import data_name
from mtl.config.schema import Config, HookCfg
from mtl.core import distributed as dist
from mtl.core.errors import UserError
from mtl.core.runtime import use_amp
from mtl.data.mix import batch_mix
from mtl.engine.averaging import SWA, WeightEMA, use_swa_lr
from mtl.engine.bn_recompute import BatchNormRecomputeHook
from mtl.engine.budget import run_budget
from mtl.engine.chance import ChanceWarningHook
from mtl.engine.extension import StepExtension
from mtl.engine.hooks import (
    HOOKS,
    CheckpointHook,
    ConsoleHook,
    EarlyStoppingHook,
    MetricsFileHook,
    TensorBoardHook,
    UnfreezeHook,
)
from mtl.engine.optim import build_optimizer, build_scheduler
from mtl.engine.trainer import Hook, Trainer, TrainerOptions
from mtl.models.freezing import L2SP
from mtl.models.layer_depth import model_scales
from mtl.tasks.base import Task
from mtl.weighting.base import WEIGHTINGS, Weighting


def trainer_options(
    cfg: Config, device: torch.device, generator: torch.Generator, *, quiet: bool = False, **more: Any
) -> TrainerOptions:
    """The loop's settings from ``cfg.train`` (epochs, amp, grad_clip, progress unless ``quiet``, seed, accumulate,
    steps, val_every) and ``cfg.data.mix`` on ``device``, with ``generator`` as the shuffle generator; ``more`` sets
    further fields (grad_on, monitor, ..., and epochs: a step budget's, see ``mtl.engine.budget``)."""
    return TrainerOptions(
        device=device,
        amp=use_amp(cfg.train.amp, device),
        grad_clip=cfg.train.grad_clip,
        progress=cfg.train.progress and not quiet,
        seed=cfg.train.seed,
        generator=generator,
        **{
            "epochs": cfg.train.epochs,
            "mix": batch_mix(cfg.data.mix, cfg.train.seed),
            "accumulate": cfg.train.accumulate,
            "steps": cfg.train.steps,
            "val_every": cfg.train.val_every,
            **more,
        },
    )


def build_hooks(
    cfg: Config,
    run_dir: Path,
    *,
    classes: Mapping[str, List[str]],
    meta: Mapping[str, Any],
    hparams: Optional[Mapping[str, Any]] = None,
    encoder: Optional[nn.Module] = None,
    graph_model: Optional[nn.Module] = None,
    n_images: Optional[int] = None,
    quiet: bool = False,
    named: Optional[Sequence[Hook]] = None,
) -> List[Hook]:
    """A run's hooks in the order they run: mtl's own, then the ones ``train.hooks`` names.

    mtl's own: ``UnfreezeHook`` (``train.unfreeze`` on ``encoder``; none without an encoder); on process 0 only,
    ``MetricsFileHook``, ``TensorBoardHook`` (``run_hparams(cfg)`` with the values ``hparams`` sets, e.g. a
    continual run's ``method``: a key that ``run_hparams`` lacks is a ValueError, so that every run has the same
    keys; ``n_images`` grid images, by default ``train.log_images``; ``graph_model``'s graph when
    ``train.log_graph``) and ``CheckpointHook`` (with ``meta`` in every checkpoint); then ``ConsoleHook`` on process
    0 unless ``quiet``, and ``ChanceWarningHook`` on process 0; ``BatchNormRecomputeHook`` on every process with
    ``train.bn_recompute``, after ``UnfreezeHook`` (at the end of training, before TensorBoard draws the delivered
    weights' confusion matrices and ``CheckpointHook`` loads best.pt). The named hooks run on every process:
    ``named`` when they were built already (``config_hooks``), else built here.
    """
    hooks: List[Hook] = []
    if encoder is not None:
        hooks.append(UnfreezeHook(encoder, cfg.train.unfreeze, cfg.optim))
    if cfg.train.bn_recompute:  # before TensorBoardHook: the confusion matrices it draws are the delivered weights'
        hooks.append(BatchNormRecomputeHook(run_dir, meta))
    if dist.is_main():
        hooks += [
            MetricsFileHook(run_dir),
            TensorBoardHook(
                run_dir,
                hparams=_hparams(cfg, hparams or {}),
                classes=classes,
                mean=cfg.data.mean,
                std=cfg.data.std,
                n_images=cfg.train.log_images if n_images is None else n_images,
                graph_model=graph_model if cfg.train.log_graph else None,
            ),
            CheckpointHook(
                run_dir, meta, keep_top_k=cfg.train.checkpoints.keep_top_k, every=cfg.train.checkpoints.every_n_epochs
            ),
        ]
        if not quiet:
            hooks.append(ConsoleHook())
        hooks.append(ChanceWarningHook())
    hooks += config_hooks(cfg) if named is None else named
    return hooks


def config_hooks(cfg: Config) -> List[Hook]:
    """``train.early_stop``'s hook, then the hooks ``train.hooks`` names, each built with its options. An unknown name
    is the registry's UserError (with the close names); an unknown or missing option is one UserError line naming the
    options the hook takes."""
    stop = cfg.train.early_stop
    early = [EarlyStoppingHook(stop.patience, stop.min_delta)] if stop is not None else []
    return early + [_config_hook(i, entry) for i, entry in enumerate(cfg.train.hooks)]


def _config_hook(i: int, entry: HookCfg) -> Hook:
    builder = HOOKS.get(entry.name)
    params = list(inspect.signature(builder).parameters.values())
    keywords = [p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    known = [p.name for p in keywords]
    unknown = [k for k in entry.options if k not in known]
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params):
        raise UserError(
            f"train.hooks[{i}]: unknown option(s) {', '.join(unknown)} for hook {entry.name!r}; "
            f"known: {', '.join(known) or 'none'}"
        )
    missing = [p.name for p in keywords if p.default is p.empty and p.name not in entry.options]
    if missing:
        raise UserError(
            f"train.hooks[{i}]: hook {entry.name!r} needs option(s) {', '.join(missing)}; "
            f"give them as {{name: {entry.name}, options: {{{missing[0]}: ...}}}}"
        )
    hook = builder(**entry.options)
    if not isinstance(hook, Hook):
        raise UserError(
            f"train.hooks[{i}]: hook {entry.name!r} built a {type(hook).__name__}, not a Hook; register "
            f"a subclass of mtl.plugins.Hook (or a function that returns one)"
        )
    return hook


NONE = "-"  # the hparam value of a setting that does not apply to a run (TensorBoard needs every key in every run)


def run_hparams(cfg: Config) -> Dict[str, Any]:
    """What TensorBoard's HParams tab shows for a run of ``cfg``: the same keys, with the same value types, for every
    run (single-task, multitask, a stage, a continual learner), ``NONE`` where a setting does not apply (the weighting
    of a single-task run, ``grad_on`` of a loss-level weighting, ``method`` outside continual runs)."""
    multitask = len(cfg.tasks) > 1
    gradient = multitask and getattr(WEIGHTINGS.get(cfg.weighting.name), "gradient_level", False)
    return {
        "data": data_name(cfg),
        "tasks": ",".join(cfg.tasks),
        "encoder": cfg.model.encoder,
        "arch": cfg.model.arch,
        "weights": str(cfg.model.weights) if cfg.model.weights else NONE,
        "freeze": str(cfg.model.freeze),
        "weighting": cfg.weighting.name if multitask else NONE,
        "grad_on": cfg.weighting.grad_on if gradient else NONE,
        "method": NONE,
        "optimizer": cfg.optim.name,
        "lr": float(cfg.optim.lr),
        "weight_decay": float(cfg.optim.weight_decay),
        "schedule": cfg.sched.name,
        "batch_size": cfg.data.batch_size,
        "epochs": cfg.train.epochs,
        "seed": cfg.train.seed,
        "monitor": cfg.train.monitor,
    }


def _hparams(cfg: Config, values: Mapping[str, Any]) -> Dict[str, Any]:
    hp = run_hparams(cfg)
    unknown = [k for k in values if k not in hp]
    if unknown:
        raise ValueError(f"hparams {', '.join(unknown)} are not among run_hparams' keys ({', '.join(hp)})")
    return {**hp, **values}


def build_trainer(
    cfg: Config,
    model: nn.Module,
    tasks: Mapping[str, Task],
    loaders: Mapping[str, Any],
    *,
    device: torch.device,
    generator: torch.Generator,
    hooks: Sequence[Hook],
    optimized: Optional[nn.Module] = None,
    weighting: Optional[Weighting] = None,
    l2sp: Optional[L2SP] = None,
    extension: Optional[StepExtension] = None,
    quiet: bool = False,
    **options: Any,
) -> Trainer:
    """The trainer of one run: ``cfg.optim`` over the parameters of ``optimized`` (the model whose weights train,
    by default ``model``, with ``optim.layer_decay``'s layer scales on its encoder; a learnable weighting's
    parameters join at the base lr without decay), ``cfg.sched`` over the run's steps, the options of
    ``trainer_options`` (``options`` sets further fields) and ``hooks``; the weight averages of ``train.ema`` /
    ``train.swa`` over ``model`` (with SWA's learning rate, when it sets one)."""
    target = optimized if optimized is not None else model
    decay = cfg.optim.layer_decay
    optimizer = build_optimizer(target, cfg.optim, model_scales(target, decay) if decay is not None else None)
    if weighting is not None and any(True for _ in weighting.parameters()):  # learnable task weights (uncertainty)
        optimizer.add_param_group(
            {
                "params": list(weighting.parameters()),
                "lr": cfg.optim.lr,
                "initial_lr": cfg.optim.lr,
                "weight_decay": 0.0,
                "lr_mult": 1.0,
                "name": "weighting",
            }
        )
    samples = weighting.samples if weighting is not None else 1  # MoDo, SDMGrad: one step per `samples` batches
    budget = run_budget(cfg.train, len(loaders["train"]), samples)
    steps = budget.per_epoch
    scheduler = build_scheduler(optimizer, cfg.sched, budget.epochs, steps, cfg.train.steps)
    ema = WeightEMA(model, cfg.train.ema.decay, cfg.train.ema.warmup) if cfg.train.ema is not None else None
    swa = SWA(model, cfg.train.swa.start_epoch) if cfg.train.swa is not None else None
    if swa is not None and cfg.train.swa.lr is not None:
        per_epoch = max(steps, 1)  # as build_scheduler counts them
        start, anneal = cfg.train.swa.start_epoch * per_epoch, round(cfg.train.swa.anneal_epochs * per_epoch)
        use_swa_lr(scheduler, start, anneal, cfg.train.swa.lr / cfg.optim.lr)
    return Trainer(
        model,
        tasks,
        loaders,
        optimizer,
        scheduler,
        trainer_options(cfg, device, generator, quiet=quiet, **{"epochs": budget.epochs, **options}),
        hooks=hooks,
        weighting=weighting,
        l2sp=l2sp,
        extension=extension,
        ema=ema,
        swa=swa,
    )
