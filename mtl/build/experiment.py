"""Everything a run needs, built from one config: data, tasks, model, weighting, the score that picks the best epoch,
and the speed-ups (cached features, channels_last, compile)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtl.build.data import build_data
from mtl.build.model import (
    build_model,
    check_data_size,
    config_encoder,
    model_input_size,
    parameter_counts,
)
from mtl.config.load import task_configs
from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.core.runtime import seed_everything, select_device, use_amp
from mtl.data.loaders import in_order
from mtl.engine.budget import Budget, run_budget
from mtl.engine.feature_cache import (
    HeadsOnFeatures,
    cache_features,
    feature_cache_blocker,
)
from mtl.engine.monitor import default_monitor, delta_m, load_baseline
from mtl.engine.trainer import accumulate_refusal
from mtl.models.batchnorm import set_bn_momentum, trained_bn_layers
from mtl.models.freezing import L2SP, apply_freeze, check_unfreeze
from mtl.models.layer_depth import model_scales
from mtl.models.transfer import TransferModel
from mtl.tasks.base import LOSSES, Task
from mtl.weighting import Weighting, build_weighting


@dataclass
class Experiment:
    """Everything a run needs, built from one config."""

    cfg: Config
    model: TransferModel
    tasks: Dict[str, Task]
    datasets: Dict[str, Dataset]
    loaders: Dict[str, DataLoader]
    device: torch.device
    generator: torch.Generator
    weighting: Weighting
    l2sp: Optional[L2SP] = None
    info: Dict[str, Any] = field(default_factory=dict)
    input_size: List[int] = field(default_factory=list)  # (H, W) of the images the model sees


def build_experiment(cfg: Config) -> Experiment:
    """Data sets, tasks (class counts checked against the data), model with weights and freezing, loaders."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = select_device(cfg.train.device)
    # The encoder first: a weights file that is missing, unreadable or does not fit is refused before any image is
    # decoded or cached. Building the data draws nothing from the global random generators, so the encoder and the
    # heads start from the same draws in either order.
    encoder = config_encoder(cfg)
    tasks, datasets, loaders, generator, info = build_data(cfg, device)

    input_size = model_input_size(loaders.get("val", loaders["train"]))
    if cfg.multi_input:  # the encoder takes every task's images
        sizes = {}
        for name, one in task_configs(cfg).items():
            sizes[name] = model_input_size(loaders.get("val", loaders["train"]).loaders[name])
            check_data_size(one, encoder, sizes[name], f"tasks.{name}.data")
        if cfg.model.arch not in ("hard", "mtan") and len({tuple(s) for s in sizes.values()}) > 1:
            shown = ", ".join(f"{name} {h}x{w}" for name, (h, w) in sizes.items())
            raise UserError(
                f"the tasks' images differ in size ({shown}), but model.arch={cfg.model.arch} is built for one "
                f"size; give every task's data the same image size, or use model.arch=hard or mtan"
            )
    else:
        check_data_size(cfg, encoder, input_size)
    l2sp = L2SP(encoder, cfg.optim.l2sp) if cfg.optim.l2sp > 0 else None
    apply_freeze(encoder, cfg.model.freeze)
    model = build_model(cfg, encoder, tasks, input_size).to(device)
    _batchnorm_settings(cfg, model)
    if cfg.optim.layer_decay is not None:
        model_scales(model, cfg.optim.layer_decay)  # an encoder or arch without block structure: refused here
    if l2sp is not None:
        l2sp.start = {k: v.to(device) for k, v in l2sp.start.items()}
    weighting = build_weighting(
        cfg.weighting.name, list(tasks), [t.weight for t in tasks.values()], **cfg.weighting.options
    ).to(device)
    weighting.seed = cfg.train.seed
    frozen = not any(p.requires_grad for p in model.shared_parameters())
    if weighting.gradient_level and frozen and not cfg.train.unfreeze:
        raise UserError(
            f"weighting {cfg.weighting.name} balances gradients on the shared encoder, but model.freeze "
            f"freezes all of it; unfreeze some of it or use a loss-level weighting (e.g. weighting.name=equal)"
        )
    modes = getattr(weighting, "grad_on_modes", ())
    if weighting.gradient_level and cfg.weighting.grad_on not in modes:
        raise UserError(f"weighting {cfg.weighting.name} {weighting.grad_on_reason}; set weighting.grad_on={modes[0]}")
    if weighting.gradient_level and cfg.weighting.grad_on == "representation" and model.encoder_representation is None:
        fix = "set weighting.grad_on=params" if "params" in modes else "choose another model.arch"
        raise UserError(
            f"model.arch={cfg.model.arch} has no representation that every task shares, so "
            f"weighting.grad_on=representation is undefined for it; {fix}"
        )
    if cfg.multi_input and weighting.gradient_level and cfg.weighting.grad_on == "representation":
        raise UserError(
            "weighting.grad_on=representation needs one shared representation, but a multi-input run "
            "(tasks.<t>.data) encodes each task's own images; set weighting.grad_on=params"
        )
    if cfg.multi_input and (weighting.samples > 1 or weighting.bilevel):
        what = "draws meta batches of all tasks at once" if weighting.bilevel else "takes several batches per step"
        raise UserError(
            f"weighting {cfg.weighting.name} {what}, which multi-input runs (tasks.<t>.data) do not support; "
            f"choose another weighting.name"
        )
    _check_mix(cfg, tasks)
    _check_accumulate(cfg, weighting)
    budget = run_budget(cfg.train, len(loaders["train"]), weighting.samples)
    check_unfreeze(encoder, cfg.train.unfreeze, budget.epochs, cfg.model.freeze, budget.per_epoch, cfg.train.steps)
    _check_swa_start(cfg, budget)
    info["params"] = parameter_counts(model)
    info["budget"] = {**budget.as_dict(), "val_every": cfg.train.val_every}
    return Experiment(cfg, model, tasks, datasets, loaders, device, generator, weighting, l2sp, info, input_size)


def _check_swa_start(cfg: Config, budget: Budget) -> None:
    """``train.swa.start_epoch`` within a step budget's epochs (the config checks it against ``train.epochs``)."""
    swa = cfg.train.swa
    if swa is not None and cfg.train.steps is not None and swa.start_epoch >= budget.epochs:
        raise UserError(
            f"train.swa.start_epoch is {swa.start_epoch} but the run has {budget.epochs} epochs (train.steps "
            f"{budget.total} at {budget.per_epoch} steps an epoch; 0-based: the last is {budget.epochs - 1}), so "
            f"nothing would be averaged; lower start_epoch or raise train.steps"
        )


def _batchnorm_settings(cfg: Config, model: nn.Module) -> None:
    """``model.bn_momentum`` set on every BatchNorm layer of the built model (weights loaded); it, or
    ``train.bn_recompute``, refused in one line for a model without a BatchNorm layer to act on."""
    if cfg.model.bn_momentum is not None and set_bn_momentum(model, cfg.model.bn_momentum) == 0:
        raise UserError(
            f"model.bn_momentum is {cfg.model.bn_momentum:g}, but {cfg.model.encoder} with its heads has no BatchNorm "
            f"layer; remove model.bn_momentum"
        )
    if cfg.train.bn_recompute and not cfg.train.unfreeze and not trained_bn_layers(model):
        raise UserError(
            f"train.bn_recompute recomputes the statistics of BatchNorm layers that train, but {cfg.model.encoder} "
            f"with its heads has none (model.freeze freezes them, or there are none); remove train.bn_recompute"
        )


def _check_mix(cfg: Config, tasks: Dict[str, Task]) -> None:
    """``data.mix`` refused in one line where it cannot apply: a task whose targets do not mix, a registered loss
    (it takes the data's labels), a multi-input run, features cached once."""
    if cfg.data.mix is None:
        return
    if cfg.multi_input:
        raise UserError(
            "data.mix mixes the images of one batch, but a multi-input run (tasks.<t>.data) draws one batch per task; "
            "remove data.mix"
        )
    for name, task in tasks.items():
        if not task.mixable:
            raise UserError(
                f"data.mix blends image-level labels, but tasks.{name} is a {task.type_name} task, whose targets "
                f"cannot be mixed (only classification, binary and multilabel ones); remove data.mix or that task"
            )
        loss = cfg.tasks[name].loss
        if loss is not None and loss in LOSSES:
            raise UserError(
                f"data.mix trains on mixed (soft) targets, but tasks.{name}.loss is the registered loss {loss!r}, "
                f"which takes the data's labels; remove data.mix or tasks.{name}.loss"
            )
    if cfg.train.cache_features == "on":
        raise UserError(
            "data.mix mixes the input images, but train.cache_features=on trains the heads on features computed "
            "once; set train.cache_features=auto (it then trains on images) or remove data.mix"
        )


def _check_accumulate(cfg: Config, weighting: Weighting) -> None:
    """``train.accumulate`` > 1 refused in one line with a multi-input run or a weighting it is not exact for."""
    n = cfg.train.accumulate
    if n == 1:
        return
    if cfg.multi_input:
        raise UserError(
            f"train.accumulate={n} is not supported in a multi-input run (tasks.<t>.data: each task's batches have "
            f"their own sizes); use train.accumulate=1"
        )
    if not weighting.accumulable:
        raise UserError(f"train.accumulate={n} {accumulate_refusal(weighting)}")


def build_monitor(cfg: Config, tasks: Dict[str, Task]) -> Callable[[Dict[str, Any]], float]:
    """The score (higher is better) that ``train.monitor`` names, as a function of a phase's metrics."""
    name = cfg.train.monitor
    directions = {t: task.metric_directions for t, task in tasks.items()}
    if cfg.train.baseline is not None:
        load_baseline(cfg.train.baseline, directions)  # fail before training, not at the first epoch's end
    if name == "auto":
        if all("acc" in d for d in directions.values()):
            return default_monitor
        name = "delta_m" if cfg.train.baseline else "loss"
    if name == "loss":
        return lambda m: -m["loss"]
    if name == "delta_m":
        if not cfg.train.baseline:
            raise UserError(
                "train.monitor=delta_m needs train.baseline, a file of single-task results {task: {metric: value}}"
            )
        return lambda m: m["delta_m"]
    task, _, metric = name.partition(".")
    if task not in tasks or metric not in directions[task]:
        known = [f"{t}.{k}" for t, d in directions.items() for k in d]
        raise UserError(
            f"train.monitor {name!r} is not a task metric; use auto, loss, delta_m or one of: {', '.join(known)}"
        )
    sign = 1.0 if directions[task][metric] else -1.0
    return lambda m: sign * m["tasks"][task][metric]


def _delta_m_fn(cfg: Config, tasks: Dict[str, Task]) -> Optional[Callable[[Dict[str, Any]], float]]:
    if cfg.train.baseline is None:
        return None
    directions = {t: task.metric_directions for t, task in tasks.items()}
    base = load_baseline(cfg.train.baseline, directions)
    return lambda m: delta_m(m["tasks"], base, directions)


def _speed_up(cfg: Config, exp: Experiment) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model and loaders to train: cached encoder features, channels_last and torch.compile as configured."""
    t = cfg.train
    model: nn.Module = exp.model
    loaders: Dict[str, Any] = exp.loaders
    has_conv = any(isinstance(m, nn.Conv2d) for m in exp.model.modules())
    # auto = on, on CPUs too: 1.01x to 1.16x there, for rounding 1e-7 to 1e-6 further from float64
    # (benchmarks/README.md)
    exp.info["channels_last"] = has_conv and t.channels_last != "off"
    if exp.info["channels_last"]:
        exp.model.to(memory_format=torch.channels_last)
    augmenting = cfg.data.augment != "none" or cfg.data.auto_augment is not None or cfg.data.random_erasing > 0
    blocker = feature_cache_blocker(
        exp.model, unfreezing=bool(t.unfreeze), augmenting=augmenting, mode=t.cache_features
    )
    if blocker is None and exp.l2sp is not None:
        blocker = "optim.l2sp needs the encoder's weights in the loss"
    if blocker is None and cfg.multi_input:
        blocker = "a multi-input run (tasks.<t>.data) encodes each task's own images"
    if blocker is None and cfg.data.mix is not None:
        blocker = "data.mix mixes the input images"
    if blocker is None:
        views = t.feature_views if augmenting else 1
        amp = use_amp(t.amp, exp.device)
        loaders, seconds = cache_features(
            exp.model,
            exp.loaders,
            {s: in_order(loader) for s, loader in exp.loaders.items()},
            views,
            exp.device,
            amp,
            exp.generator,
            t.seed,
        )
        model = HeadsOnFeatures(exp.model)
        exp.info["pipeline"] += (
            f"; encoder features cached once ({views} view{'s' if views > 1 else ''}, {seconds:.1f} s)"
        )
        exp.info["feature_cache_s"] = seconds
    elif t.cache_features == "on":
        raise UserError(f"train.cache_features is on, but the features cannot be cached: {blocker}")
    if t.compile:
        model.compile()
    return model, loaders
