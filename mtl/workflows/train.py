"""Build a run from a config and execute it: data, model, optimizer, hooks, run directory, summary."""
from __future__ import annotations

import inspect
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from mtl.core.checkpoint import atomic_write, load_checkpoint, save_json
from mtl.workflows.compare import delta_m, load_baseline
from mtl.config.load import Sources, record_sources, build_config, config_to_dict, deep_merge, dump_config
from mtl.data import DATASETS, ClassSubset, build_transforms, subset_per_class
from mtl.core import distributed as dist
from mtl.data.batches import DeviceBatches, StridedBatchSampler, default_cache_dir, image_store, loader_batch_size
from mtl.data.dense_batches import DenseBatches, can_gather
from mtl.data.device_augment import BatchAugment
from mtl.models.encoders import build_encoder, check_input_size
from mtl.core.errors import UserError
from mtl.models.freezing import L2SP, apply_freeze, check_unfreeze
from mtl.models.heads import HEADS
from mtl.engine.hooks import CheckpointHook, ConsoleHook, MetricsFileHook, TensorBoardHook, UnfreezeHook
from mtl.engine.feature_cache import FeatureBatches, HeadsOnFeatures, cache_features, feature_cache_blocker
from mtl.models.transfer import TransferModel
from mtl.workflows.runs import model_input_size, task_targets
from mtl.engine.optim import build_optimizer, build_scheduler
from mtl.core.rundir import RunLock, check_not_in_use, lock_run_dir, make_run_dir, no_checkpoint_yet, resume_hint
from mtl.config.schema import Config, DataCfg, HeadCfg
from mtl.tasks.base import LOSSES, METRICS, Task, add_custom_metrics, build_task, use_custom_loss
from mtl.engine.trainer import Hook, Trainer, default_monitor, ignore_stop_signals, stop_signals_blocked
from mtl.weighting import Weighting, build_weighting


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally make torch use deterministic kernels only."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return dist.local_device() if dist.world_size() > 1 else torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA GPU is available; use train.device=auto or cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"train.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                        f"numbered from 0; use cuda:0 ... or train.device=auto")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device is 'mps' but no Apple-silicon GPU (MPS) is available; use train.device=auto or cpu")
    return device


def use_amp(mode: str, device: torch.device) -> bool:
    if mode == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "bf16"


def build_dataset(cfg: DataCfg, split: str, train: bool) -> Dataset:
    """A registered data set with the config's transforms; unknown options are a clear error.

    Builders with an ``augment`` parameter (multitask data sets with dense or position-dependent targets)
    do their own joint augmentation and normalisation: they get ``augment``, ``mean`` and ``std`` instead of
    a transform.
    """
    builder = DATASETS.get(cfg.name)
    params = inspect.signature(builder).parameters
    reserved = ("split", "root", "transform", "augment", "mean", "std")
    known = [p for p in params if p not in reserved]
    for key in cfg.options:
        if key not in known:
            raise UserError(f"unknown option data.options.{key} for data set {cfg.name!r}; known: {', '.join(known) or 'none'}")
    if "augment" in params:
        dataset = builder(split=split, root=cfg.root, augment=train and cfg.augment != "none", mean=cfg.mean,
                          std=cfg.std, **cfg.options)
    else:
        transform = build_transforms(train=train, image_size=cfg.image_size, resize_size=cfg.resize_size,
                                     mean=cfg.mean, std=cfg.std, augment=cfg.augment, crop_padding=cfg.crop_padding)
        dataset = builder(split=split, root=cfg.root, transform=transform, **cfg.options)
    return ClassSubset(dataset, cfg.classes) if cfg.classes is not None else dataset


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers leave Ctrl-C and SIGTERM to the main process from the moment they are forked
    (``stop_signals_blocked`` around the fork, then ``ignore_stop_signals`` in each worker)."""

    def __iter__(self) -> Any:
        with stop_signals_blocked():
            return super().__iter__()


def _collate(tasks: Dict[str, Task]):
    def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = default_collate(items)
        return {"image": batch["image"], "targets": {t: batch[task.target] for t, task in tasks.items()}}
    return collate


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


def build_data(cfg: Config, device: torch.device) -> Tuple[Dict[str, Task], Dict[str, Dataset], Dict[str, DataLoader],
                                                            torch.Generator, Dict[str, Any]]:
    """Tasks (class counts checked against the data), data sets, loaders, the shuffling generator, data info.

    Under torchrun, process 0 builds first (it may write caches that the others then read), and
    ``data.batch_size`` is the global batch, split evenly over the processes.
    """
    world = dist.world_size()
    for size in (cfg.data.batch_size, cfg.data.val_batch_size or cfg.data.batch_size):
        if size % world:
            raise UserError(f"data.batch_size {size} does not split over {world} processes; under torchrun it is "
                            f"the global batch, so use a multiple of {world}")
    if dist.is_main():
        try:
            built = _build_data(cfg, device)
        except UserError as e:
            dist.broadcast_object(str(e))
            raise
        dist.broadcast_object(None)
        return built
    error = dist.broadcast_object(None)
    if error is not None:
        raise UserError(error)
    return _build_data(cfg, device)


def _build_data(cfg: Config, device: torch.device) -> Tuple[Dict[str, Task], Dict[str, Dataset], Dict[str, Any],
                                                             torch.Generator, Dict[str, Any]]:
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False)
    classes = list(getattr(train_ds, "classes", []))
    skipped = len(getattr(train_ds, "skipped", [])) + len(getattr(val_ds, "skipped", []))
    tasks = build_tasks(cfg, train_ds, classes)
    if cfg.data.labels_per_class:
        train_ds = subset_per_class(train_ds, cfg.data.labels_per_class, cfg.train.seed)
    generator = torch.Generator()
    info = {"classes": classes, "skipped_images": skipped, "train_size": len(train_ds), "val_size": len(val_ds)}
    loaders = _batched_loaders(cfg, tasks, train_ds, val_ds, device, generator, info)
    if loaders is None:
        common = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", collate_fn=_collate(tasks),
                      worker_init_fn=ignore_stop_signals)
        val_batch = cfg.data.val_batch_size or cfg.data.batch_size
        if dist.world_size() == 1:
            loaders = {
                "train": SignalSafeLoader(train_ds, batch_size=cfg.data.batch_size, shuffle=True, generator=generator,
                                          **common),
                "val": SignalSafeLoader(val_ds, batch_size=val_batch, shuffle=False, **common),
            }
        else:
            r, w = dist.rank(), dist.world_size()
            loaders = {
                "train": SignalSafeLoader(train_ds, batch_sampler=StridedBatchSampler(
                    len(train_ds), cfg.data.batch_size, True, generator, r, w), **common),
                "val": SignalSafeLoader(val_ds, batch_sampler=StridedBatchSampler(len(val_ds), val_batch, False, None,
                                                                                  r, w), **common),
            }
        info["pipeline"] = "per item"
    return tasks, {"train": train_ds, "val": val_ds}, loaders, generator, info


def _batched_loaders(cfg: Config, tasks: Dict[str, Task], train_ds: Dataset, val_ds: Dataset, device: torch.device,
                     generator: torch.Generator, info: Dict[str, Any]) -> Optional[Dict[str, DeviceBatches]]:
    """Device-augmented batches from decoded image stores (``data.pipeline``), or None for the per-item path."""
    d = cfg.data
    if d.pipeline == "items":
        return None
    targets = {task.target for task in tasks.values()}
    size = d.cache_size or round(d.resize_size * 4 / 3)
    cache_dir = _cache_dir(d)
    stores = {}
    if targets == {"label"}:
        for split, ds in (("train", train_ds), ("val", val_ds)):
            stores[split] = image_store(ds, cache_size=size, cache_dir=cache_dir,
                                        budget_bytes=int(d.cache_budget_gb * 2**30), progress=cfg.train.progress)
    if (not stores or any(s is None for s in stores.values())) and can_gather(train_ds) and can_gather(val_ds):
        return _dense_batches(cfg, tasks, train_ds, val_ds, device, generator, info)
    if not stores or any(s is None for s in stores.values()):
        if d.pipeline == "batched":
            raise UserError(f"data.pipeline=batched needs a single-label image data set (folder, fashion_mnist, mnist, "
                            f"cifar10/100, captcha_chars, shapes) or scenes, multi_fashion, celeba; {d.name!r} "
                            f"with targets {', '.join(sorted(targets))} "
                            f"has no image store; use data.pipeline=items or auto")
        return None
    kw = dict(image_size=d.image_size, resize_size=d.resize_size, crop_padding=d.crop_padding, mean=d.mean, std=d.std)
    names = list(tasks)
    shard = dict(rank=dist.rank(), world=dist.world_size())
    loaders = {
        "train": DeviceBatches(stores["train"], BatchAugment(train=True, augment=d.augment, **kw),
                               batch_size=d.batch_size, shuffle=True, device=device, generator=generator,
                               target_names=names, dataset=train_ds, collate_fn=_collate(tasks), **shard),
        "val": DeviceBatches(stores["val"], BatchAugment(train=False, augment="none", **kw),
                             batch_size=d.val_batch_size or d.batch_size, shuffle=False, device=device,
                             target_names=names, dataset=val_ds, collate_fn=_collate(tasks), **shard),
    }
    nbytes = sum(s.nbytes for s in stores.values() if s.location == "memory")
    where = sorted({s.location for s in stores.values() if s.location != "memory"})
    info["pipeline"] = ("batched on " + device.type + f", uint8 images {nbytes / 2**20:,.0f} MiB in memory"
                        + (f" + memory-mapped {', '.join(where)}" if where else ""))
    for split, st in stores.items():
        info[f"{split}_size"] = len(st)
        info["skipped_images"] += st.dropped
    return loaders


def _cache_dir(d: DataCfg) -> Optional[Path]:
    """Where decoded images that exceed the memory budget go: data.cache_dir, else <data.root>/.mtl_cache."""
    return Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir(d.root)


def _dense_batches(cfg: Config, tasks: Dict[str, Task], train_ds: Dataset, val_ds: Dataset, device: torch.device,
                   generator: torch.Generator, info: Dict[str, Any]) -> Dict[str, DenseBatches]:
    """Whole batches gathered by the data set itself (in-memory multitask sets), augmented on the device."""
    d, shard = cfg.data, dict(rank=dist.rank(), world=dist.world_size())
    targets = {t: task.target for t, task in tasks.items()}
    info["pipeline"] = f"batched on {device.type} (the data set's in-memory tensors)"
    if callable(getattr(train_ds, "prepare", None)):  # image files: decoded once first (celeba)
        kw = dict(cache_size=d.cache_size, cache_dir=_cache_dir(d), budget_bytes=int(d.cache_budget_gb * 2**30),
                  progress=cfg.train.progress)
        where = {train_ds.prepare(**kw), val_ds.prepare(**kw)}
        mib = (train_ds.nbytes + val_ds.nbytes) / 2**20
        info["pipeline"] = (f"batched on {device.type} (images decoded once: uint8 {mib:,.0f} MiB "
                            + ("in memory" if where == {"memory"} else "memory-mapped") + ")")
    return {
        "train": DenseBatches(train_ds, targets, batch_size=d.batch_size, shuffle=True, device=device,
                              augment=bool(getattr(train_ds, "augment", False)), generator=generator,
                              collate_fn=_collate(tasks), **shard),
        "val": DenseBatches(val_ds, targets, batch_size=d.val_batch_size or d.batch_size, shuffle=False, augment=False,
                            device=device, collate_fn=_collate(tasks), **shard),
    }


def build_experiment(cfg: Config) -> Experiment:
    """Data sets, tasks (class counts checked against the data), model with weights and freezing, loaders."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = select_device(cfg.train.device)
    tasks, datasets, loaders, generator, info = build_data(cfg, device)

    encoder = build_encoder(cfg.model.encoder, weights=cfg.model.weights, **cfg.model.encoder_options)
    input_size = model_input_size(loaders.get("val", loaders["train"]))
    check_data_size(cfg, encoder, input_size)
    l2sp = L2SP(encoder, cfg.optim.l2sp) if cfg.optim.l2sp > 0 else None
    apply_freeze(encoder, cfg.model.freeze)
    check_unfreeze(encoder, cfg.train.unfreeze, cfg.train.epochs, cfg.model.freeze)
    model = build_model(cfg, encoder, tasks).to(device)
    if l2sp is not None:
        l2sp.start = {k: v.to(device) for k, v in l2sp.start.items()}
    weighting = build_weighting(cfg.weighting.name, list(tasks), [t.weight for t in tasks.values()],
                                **cfg.weighting.options).to(device)
    weighting.seed = cfg.train.seed
    frozen = not any(p.requires_grad for p in model.shared_parameters())
    if weighting.gradient_level and frozen and not cfg.train.unfreeze:
        raise UserError(f"weighting {cfg.weighting.name} balances gradients on the shared encoder, but model.freeze "
                        f"freezes all of it; unfreeze some of it or use a loss-level weighting (e.g. weighting.name=equal)")
    info["params"] = parameter_counts(model)
    return Experiment(cfg, model, tasks, datasets, loaders, device, generator, weighting, l2sp, info, input_size)


def check_data_size(cfg: Config, encoder: nn.Module, input_size: List[int]) -> None:
    """Refuse images (``input_size``: the (H, W) the data gives the model) that the encoder cannot take."""
    height, width = input_size
    if "augment" in inspect.signature(DATASETS.get(cfg.data.name)).parameters:  # sizes its own images
        given = f"data set {cfg.data.name} gives {height}x{width} images (data.image_size does not apply to it)"
        fix = "change the image size in data.options if the data set has one, or choose another model.encoder"
    else:
        given = f"data.image_size={cfg.data.image_size}"
        fix = "change data.image_size, or choose another model.encoder"
    check_input_size(encoder, height, width, given, fix)


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": n_params, "trainable": n_train, "frozen": n_params - n_train}


def build_tasks(cfg: Config, train_ds: Dataset, classes: List[str]) -> Dict[str, Task]:
    """Tasks of the config, completed and checked against what the data set provides.

    Multitask data sets describe their targets (``targets``: key -> type, class count, class names);
    single-label data sets have one ``label`` target whose classes are ``classes``.
    """
    declared: Dict[str, Dict[str, Any]] = dict(getattr(train_ds, "targets", None) or {})
    if not declared:
        declared = {"label": {"type": "classification", "num_classes": len(classes), "classes": classes}}
    if cfg.weighting.name == "equal" and any(tc.weight != 1 for tc in cfg.tasks.values()):
        raise UserError("task weights are set but weighting.name is equal, which ignores them; "
                        "use weighting.name=static to weight the task losses")
    tasks: Dict[str, Task] = {}
    for name, tc in cfg.tasks.items():
        target = tc.target or (name if name in declared or len(declared) > 1 else "label")
        if target not in declared:
            raise UserError(f"tasks.{name}: the data set {cfg.data.name!r} has no target {target!r}; it provides "
                            f"{', '.join(declared)}; set tasks.{name}.target to one of them")
        info = declared[target]
        type_ = tc.type or info.get("type", "classification")
        n_data = info.get("num_classes", info.get("num_outputs"))
        names = list(info.get("classes", []))
        if tc.num_classes is not None and n_data and type_ != "binary" and tc.num_classes != n_data:
            shown = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
            raise UserError(f"tasks.{name}.num_classes is {tc.num_classes} but the data has {n_data} classes{shown}; "
                            f"fix num_classes or remove it")
        n = tc.num_classes if tc.num_classes is not None else n_data
        if type_ == "binary" and n is not None and n != 2:
            raise UserError(f"tasks.{name} is binary but the data has {n} classes; use type: classification")
        options = dict(tc.options)
        custom_loss = tc.loss is not None and tc.loss in LOSSES
        if tc.loss is not None and not custom_loss:
            options["loss"] = tc.loss
        if tc.label_smoothing:
            options["label_smoothing"] = tc.label_smoothing
        try:
            task = build_task(name, type=type_, target=target, num_classes=n, weight=tc.weight, classes=names, **options)
        except UserError as e:
            raise UserError(f"tasks.{name}: {e}") from None
        task.type_name = type_
        if custom_loss:
            use_custom_loss(task, tc.loss)
        custom = [m for m in tc.metrics or [] if m not in task.metric_directions and m in METRICS]
        if custom:
            add_custom_metrics(task, custom)
        if tc.metrics:
            unknown = [m for m in tc.metrics if m not in task.metric_directions]
            if unknown:
                raise UserError(f"tasks.{name}.metrics: unknown {', '.join(unknown)}; a {type_} task reports "
                                f"{', '.join(k for k in task.metric_directions if k != 'loss')}")
            task.report = list(tc.metrics)
        tasks[name] = task
    return tasks


def build_model(cfg: Config, encoder: nn.Module, tasks: Dict[str, Task]) -> TransferModel:
    """Heads on the shared encoder (through MTAN attention with ``model.arch: mtan``)."""
    mtan = None
    feature_info, in_dim = getattr(encoder, "feature_info", None), encoder.out_dim
    if cfg.model.arch == "mtan":
        from mtl.models.mtan import MTAN

        if not feature_info:
            raise UserError(f"model.arch=mtan needs an encoder with stage features; {cfg.model.encoder} has none")
        mtan = MTAN(feature_info, list(tasks))
        in_dim = mtan.out_dim
    elif cfg.model.arch != "hard":
        raise UserError(f"model.arch must be hard or mtan, got {cfg.model.arch!r}")
    heads = {}
    for name, task in tasks.items():
        head_cfg = cfg.tasks[name].head or HeadCfg(name="fpn" if task.dense else "linear")
        options = dict(head_cfg.options)
        if head_cfg.name == "linear" and mtan is None and not getattr(encoder, "classifier_bias", True):
            options.setdefault("bias", False)  # as the torchvision classifier layer it replaces (maxvit_t's)
        try:
            head = HEADS.get(head_cfg.name)(in_dim=in_dim, out_dim=task.out_dim, feature_info=feature_info,
                                            hidden=head_cfg.hidden, dropout=head_cfg.dropout, **options)
        except UserError as e:
            raise UserError(f"tasks.{name}.head: {e}") from None
        if getattr(head, "dense", False) != task.dense:
            kind = "a dense (per-pixel) head such as fpn or aspp" if task.dense else "a pooled head such as linear or mlp"
            raise UserError(f"tasks.{name} is a {type(task).__name__.lower()} task and needs {kind}, "
                            f"not {head_cfg.name!r}")
        heads[name] = head
    return TransferModel(encoder, heads, mtan)


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
            raise UserError("train.monitor=delta_m needs train.baseline, a file of single-task results {task: {metric: value}}")
        return lambda m: m["delta_m"]
    task, _, metric = name.partition(".")
    if task not in tasks or metric not in directions[task]:
        known = [f"{t}.{k}" for t, d in directions.items() for k in d]
        raise UserError(f"train.monitor {name!r} is not a task metric; use auto, loss, delta_m or one of: {', '.join(known)}")
    sign = 1.0 if directions[task][metric] else -1.0
    return lambda m: sign * m["tasks"][task][metric]


def _delta_m_fn(cfg: Config, tasks: Dict[str, Task]) -> Optional[Callable[[Dict[str, Any]], float]]:
    if cfg.train.baseline is None:
        return None
    directions = {t: task.metric_directions for t, task in tasks.items()}
    base = load_baseline(cfg.train.baseline, directions)
    return lambda m: delta_m(m["tasks"], base, directions)


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
    monitor, delta_m_fn = build_monitor(cfg, exp.tasks), _delta_m_fn(cfg, exp.tasks)  # refused before anything is written
    fresh = run_dir is None
    run_dir = new_run_dir(cfg) if fresh else Path(run_dir)
    lock = dist.on_main(lambda: _open_run_dir(cfg, run_dir, fresh, resume))
    try:
        return _train(cfg, exp, run_dir, resume, quiet, monitor, delta_m_fn, started)
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


def _train(cfg: Config, exp: Experiment, run_dir: Path, resume: bool, quiet: bool,
           monitor: Callable[[Dict[str, Any]], float], delta_m_fn: Optional[Callable[[Dict[str, Any]], float]],
           started: float) -> Dict[str, Any]:
    main_process = dist.is_main()  # under torchrun only process 0 writes
    model, loaders = _speed_up(cfg, exp)
    optimizer = build_optimizer(exp.model, cfg.optim)
    if any(True for _ in exp.weighting.parameters()):  # learnable task weights (uncertainty): no decay, base lr
        optimizer.add_param_group({"params": list(exp.weighting.parameters()), "lr": cfg.optim.lr,
                                   "initial_lr": cfg.optim.lr, "weight_decay": 0.0, "lr_mult": 1.0, "name": "weighting"})
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.train.epochs, len(exp.loaders["train"]))
    classes = {t: task.classes for t, task in exp.tasks.items()}
    meta = {"config": config_to_dict(cfg), "classes": classes, "encoder": cfg.model.encoder,
            "targets": task_targets(exp.tasks), "input_size": exp.input_size}
    hooks: List[Hook] = [UnfreezeHook(exp.model.encoder, cfg.train.unfreeze, cfg.optim)]
    if main_process:
        hooks += [
            MetricsFileHook(run_dir),
            TensorBoardHook(run_dir, hparams=_hparams(cfg), classes=classes, mean=cfg.data.mean, std=cfg.data.std,
                            n_images=cfg.train.log_images, log_every=cfg.weighting.log_every,
                            graph_model=exp.model if cfg.train.log_graph else None),
            CheckpointHook(run_dir, meta),
        ]
    if not quiet and main_process:
        hooks.append(ConsoleHook())
    trainer = Trainer(model, exp.tasks, loaders, optimizer, scheduler, epochs=cfg.train.epochs,
                      device=exp.device, amp=use_amp(cfg.train.amp, exp.device), grad_clip=cfg.train.grad_clip,
                      l2sp=exp.l2sp, hooks=hooks, progress=cfg.train.progress and not quiet, seed=cfg.train.seed,
                      generator=exp.generator, weighting=exp.weighting, grad_on=cfg.weighting.grad_on,
                      monitor=monitor, delta_m=delta_m_fn, channels_last=exp.info["channels_last"],
                      nonfinite=cfg.train.nonfinite)
    if resume:
        trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    if not quiet and main_process:
        p = exp.info["params"]
        print(f"run {run_dir}  |  {cfg.model.encoder} on {cfg.data.name}: {exp.info['train_size']} train / "
              f"{exp.info['val_size']} val images, {_task_text(exp.tasks)}  |  params {p['total']:,} "
              f"({p['trainable']:,} trainable)  |  device {exp.device}  |  data {exp.info['pipeline']}"
              + (f"  |  skipped {exp.info['skipped_images']} unreadable images" if exp.info["skipped_images"] else ""))
    history = trainer.fit()
    summary = _summary(cfg, run_dir, trainer, exp, history, time.perf_counter() - started)
    summary["processes"] = dist.world_size()
    if main_process:
        save_json(summary, run_dir / "summary.json", lambda: resume_hint(run_dir))
    dist.barrier()  # a next stage reads this run's checkpoints
    return summary


def _speed_up(cfg: Config, exp: Experiment) -> Tuple[nn.Module, Dict[str, Any]]:
    """The model and loaders to train: cached encoder features, channels_last and torch.compile as configured."""
    t = cfg.train
    model: nn.Module = exp.model
    loaders: Dict[str, Any] = exp.loaders
    has_conv = any(isinstance(m, nn.Conv2d) for m in exp.model.modules())
    # auto = on, on CPUs too: 1.01x to 1.16x there, for rounding 1e-7 to 1e-6 further from float64 (benchmarks/README.md)
    exp.info["channels_last"] = has_conv and t.channels_last != "off"
    if exp.info["channels_last"]:
        exp.model.to(memory_format=torch.channels_last)
    blocker = feature_cache_blocker(exp.model, unfreezing=bool(t.unfreeze), augmenting=cfg.data.augment != "none",
                                    mode=t.cache_features)
    if blocker is None and exp.l2sp is not None:
        blocker = "optim.l2sp needs the encoder's weights in the loss"
    if blocker is None:
        views = t.feature_views if cfg.data.augment != "none" else 1
        amp = use_amp(t.amp, exp.device)
        loaders, seconds = cache_features(exp.model, exp.loaders, {s: in_order(l) for s, l in exp.loaders.items()},
                                          views, exp.device, amp, exp.generator, t.seed)
        model = HeadsOnFeatures(exp.model)
        exp.info["pipeline"] += f"; encoder features cached once ({views} view{'s' if views > 1 else ''}, {seconds:.1f} s)"
        exp.info["feature_cache_s"] = seconds
    elif t.cache_features == "on":
        raise UserError(f"train.cache_features is on, but the features cannot be cached: {blocker}")
    if t.compile:
        model.compile()
    return model, loaders


def in_order(loader: Any) -> Any:
    """Every item of ``loader``'s split in a fixed order, not sharded over torchrun's processes (its
    augmentation, if any, kept): for feature caching, and for process 0's reports at the end of a run."""
    if isinstance(loader, FeatureBatches):
        return FeatureBatches(loader.views, loader.targets, batch_size=loader.batch_size, shuffle=False,
                              dataset=loader.dataset, collate_fn=loader.collate_fn, shard=False)
    if isinstance(loader, DenseBatches):
        return loader.in_order()
    if isinstance(loader, DeviceBatches):
        return DeviceBatches(loader.store, loader.augment, batch_size=loader.batch_size, shuffle=False,
                             device=loader.device, generator=torch.Generator(), target_names=loader.target_names)
    return SignalSafeLoader(loader.dataset, batch_size=loader_batch_size(loader), shuffle=False,
                            num_workers=loader.num_workers, pin_memory=loader.pin_memory, collate_fn=loader.collate_fn,
                            worker_init_fn=ignore_stop_signals)



def _task_text(tasks: Mapping[str, Task]) -> str:
    if len(tasks) == 1:
        task = next(iter(tasks.values()))
        return f"{len(task.classes)} classes" if task.classes else task.type_name
    return f"{len(tasks)} tasks (" + ", ".join(f"{t}: {task.type_name}" for t, task in tasks.items()) + ")"


def _hparams(cfg: Config) -> Dict[str, Any]:
    return {"encoder": cfg.model.encoder, "arch": cfg.model.arch, "weighting": cfg.weighting.name, "weights": str(cfg.model.weights), "freeze": str(cfg.model.freeze),
            "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "schedule": cfg.sched.name,
            "batch_size": cfg.data.batch_size, "epochs": cfg.train.epochs, "data": cfg.data.name}


def _summary(cfg: Config, run_dir: Path, trainer: Trainer, exp: Experiment, history: List[Dict[str, Any]],
             total_s: float) -> Dict[str, Any]:
    epoch_s = [m["time_s"] for m in history]
    best = history[trainer.best["epoch"] - 1] if trainer.best["epoch"] else {}
    return {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "weighting": cfg.weighting.name if len(exp.tasks) > 1 else "",
        "tasks": {t: {"type": task.type_name, "primary": task.primary, "directions": dict(task.metric_directions)}
                  for t, task in exp.tasks.items()},
        "epochs": trainer.epoch,
        "best": {"epoch": trainer.best["epoch"], "val": best.get("val"), "train": best.get("train")},
        "final": {"epoch": history[-1]["epoch"], "val": history[-1].get("val"), "train": history[-1]["train"]} if history else None,
        "steps_per_epoch": len(exp.loaders["train"]),
        "skipped_steps": trainer.skipped_steps,
        "time": {"total_s": total_s, "epoch_s": epoch_s, "mean_epoch_s": sum(epoch_s) / max(len(epoch_s), 1),
                 "train_epoch_s": [m["time_train_s"] for m in history],
                 "mean_train_epoch_s": sum(m["time_train_s"] for m in history) / max(len(history), 1)},
        **exp.info,
    }


# --------------------------------------------------------------------------- stages


def stage_configs(raw: Dict[str, Any], sources: Sources) -> List[Config]:
    """One validated config per stage (stage patches deep-merged onto the top-level config)."""
    base = {k: v for k, v in raw.items() if k != "stages"}
    configs = []
    for i, stage in enumerate(raw.get("stages") or []):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise UserError(f"stages[{i}] must be a mapping with a name, e.g. {{name: pretrain, train: {{epochs: 5}}}}")
        patch = dict(stage)  # its name too: checked as a folder name, like the run's
        stage_sources = dict(sources)
        record_sources(stage_sources, [], patch, f"{sources.get(('stages',), 'the config')}, stage {stage['name']!r}")
        configs.append(build_config(deep_merge(base, patch), stage_sources))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserError(f"stage names must be unique, got {', '.join(names)}")
    for cfg in configs:
        w = cfg.model.weights or ""
        if w.startswith("stage:") and w[6:] not in names[: names.index(cfg.name)]:
            raise UserError(f"stage {cfg.name!r}: weights {w!r} names no earlier stage; earlier: {', '.join(names[:names.index(cfg.name)]) or 'none'}")
    return configs


def run_stages(top: Config, configs: List[Config]) -> List[Dict[str, Any]]:
    """Run each stage into ``<run>/<stage>/``; ``weights: stage:<name>`` uses that stage's best encoder."""
    root = new_run_dir(top)
    if dist.is_main():
        atomic_write(root / "config.yaml", lambda tmp: dump_config(top, tmp))
    summaries, dirs = [], {}
    for i, cfg in enumerate(configs):
        if cfg.model.weights and cfg.model.weights.startswith("stage:"):
            cfg.model.weights = f"run:{dirs[cfg.model.weights[6:]]}"
        cfg.out_dir = str(root)
        if dist.is_main():
            print(f"\n=== stage {i + 1}/{len(configs)}: {cfg.name} ===")
        dirs[cfg.name] = root / cfg.name
        summaries.append(run(cfg, dirs[cfg.name]))
    if dist.is_main():
        table = stage_table(summaries)
        print("\n" + table)
        atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
        save_json({"run_dir": str(root), "stages": summaries}, root / "summary.json")
    return summaries


def stage_table(summaries: List[Dict[str, Any]]) -> str:
    """A Markdown table: best and final validation accuracy, time per epoch, trainable parameters."""
    rows = ["| stage | train images | best val acc | final val acc | s/epoch | trainable params |",
            "|---|---:|---:|---:|---:|---:|"]
    for s in summaries:
        best = (s["best"]["val"] or {}).get("acc", float("nan"))
        final = ((s["final"] or {}).get("val") or {}).get("acc", float("nan"))
        rows.append(f"| {s['name']} | {s['train_size']} | {best:.4f} | {final:.4f} | {s['time']['mean_epoch_s']:.2f} | "
                    f"{s['params']['trainable']:,} |")
    return "\n".join(rows)


def train_from_file(path: str, overrides: List[str]) -> List[Dict[str, Any]]:
    """``mtl train``: a single run, or every stage of a staged config."""
    from mtl.config.load import load_config

    raw, sources = load_config(path, overrides)
    import_config_modules(raw)
    top = build_config(raw, sources)
    if top.continual.methods:
        if len(top.stages) < 2:
            raise UserError("continual.methods needs a task sequence: two or more stages, one task each")
        from mtl.workflows.continual import run_continual

        if dist.world_size() > 1:
            raise UserError("continual runs (continual.methods) train one process; start them without torchrun")

        return [run_continual(top, stage_configs(raw, sources))]
    if top.stages:
        return run_stages(top, stage_configs(raw, sources))
    return [run(top)]


def resume_run(run_dir: str) -> Dict[str, Any]:
    """Continue a run from ``<run_dir>/checkpoints/last.pt`` with its saved config."""
    from mtl.config.load import load_config

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


def import_config_modules(raw: Dict[str, Any]) -> None:
    """Import the config's ``imports`` before anything named in it is looked up."""
    names = raw.get("imports") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"imports must be a list of module names or .py files, got {names!r}")
    if names:
        from mtl.plugins import import_modules

        import_modules(names)


_TRAINING_STATE = ("model", "optimizer", "scheduler", "epoch", "global_step", "best", "history", "rng")
# the settings that decide the model's parameters and the optimizer's state: a checkpoint resumes only into the same
_STRUCTURE = ("model.encoder", "model.encoder_options", "model.arch", "model.freeze", "tasks", "optim.name",
              "optim.weight_decay", "optim.no_decay_norm_bias", "optim.lr_mult", "weighting.name", "weighting.options",
              "train.unfreeze")
_TASK_STRUCTURE = ("type", "target", "num_classes", "head")
_ABSENT = object()


def check_resumable(run_dir: Path, cfg: Config, state: Mapping[str, Any]) -> None:
    """Refuse, before anything is written, a ``last.pt`` that is no training state or was saved with another
    architecture or optimizer than ``cfg`` (an edited config.yaml, or a checkpoint copied from another run)."""
    ckpt = run_dir / "checkpoints" / "last.pt"
    lacking = [k for k in _TRAINING_STATE if k not in state]
    if lacking:
        raise UserError(f"cannot resume {run_dir}: {ckpt} is not a training checkpoint (it lacks {', '.join(lacking)}; "
                        f"a best.pt or a weights file?); give the run's own last.pt, or start a new run with "
                        f"mtl train {run_dir / 'config.yaml'}")
    saved = state.get("config")
    if not isinstance(saved, Mapping):
        return
    now = config_to_dict(cfg)
    for key in _STRUCTURE:
        found = _difference(_structure(saved, key), _structure(now, key), key)
        if found is not None:
            where, old, new = found
            raise UserError(f"cannot resume {run_dir}: config.yaml has {where}: {_shown(new)} but {ckpt} was saved "
                            f"with {where}: {_shown(old)}; put that value back in config.yaml, or start a new run "
                            f"with mtl train {run_dir / 'config.yaml'}")


def _structure(config: Mapping[str, Any], key: str) -> Any:
    """The value at dotted ``key`` (tasks: only what shapes each task's head), or _ABSENT."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _ABSENT
        node = node[part]
    if key == "tasks" and isinstance(node, Mapping):
        return {t: {k: v for k, v in tc.items() if k in _TASK_STRUCTURE} if isinstance(tc, Mapping) else tc
                for t, tc in node.items()}
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
