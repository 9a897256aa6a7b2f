"""Data sets and loaders from ``data`` config: the per-item path, decoded image stores, whole dense batches."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset

from mtl.build.tasks import build_tasks, config_targets, dataset_targets
from mtl.config.load import task_configs
from mtl.config.schema import Config, DataCfg
from mtl.core import distributed as dist
from mtl.core.errors import UserError
from mtl.core.runtime import ignore_stop_signals
from mtl.data import DATASETS, ClassSubset, build_transforms, subset_per_class
from mtl.data.batches import (
    DeviceBatches,
    StridedBatchSampler,
    default_cache_dir,
    image_store,
)
from mtl.data.dense_batches import DenseBatches, can_gather
from mtl.data.device_augment import BatchAugment
from mtl.data.holdout import carve_validation, same_items, selects_on_test
from mtl.data.loaders import SignalSafeLoader, collate_targets
from mtl.data.multi_input import MultiInputLoader
from mtl.data.shift import Shift, build_shift, shifted_collate
from mtl.tasks.base import Task


def data_name(cfg: Config) -> str:
    """The data set a run trains on: ``data.name``, or a multi-input run's, one per task (``fashion_mnist+shapes``)."""
    return "+".join(one.data.name for one in task_configs(cfg).values()) or cfg.data.name


def build_dataset(cfg: DataCfg, split: str, train: bool) -> Dataset:
    """A registered data set with the config's transforms; unknown options are a clear error.

    Builders with an ``augment`` parameter (multitask data sets with dense or position-dependent targets)
    do their own joint augmentation and normalisation: they get ``augment``, ``mean`` and ``std`` instead of
    a transform, and ``flip`` (``data.flip``) when they take it: a builder that mirrors images takes ``flip``, one
    without it never mirrors (captcha, multi_fashion: position targets).
    """
    builder = DATASETS.get(cfg.name)
    params = check_data_options(cfg)
    if "augment" in params:
        _refuse_image_only_augmentation(cfg)
        dataset = builder(
            split=split,
            root=cfg.root,
            augment=train and cfg.augment != "none",
            mean=cfg.mean,
            std=cfg.std,
            **({"flip": cfg.flip} if "flip" in params else {}),
            **cfg.options,
        )
    else:
        transform = build_transforms(
            train=train,
            image_size=cfg.image_size,
            resize_size=cfg.resize_size,
            mean=cfg.mean,
            std=cfg.std,
            augment=cfg.augment,
            crop_padding=cfg.crop_padding,
            flip=cfg.flip,
            auto_augment=cfg.auto_augment,
            auto_augment_options=cfg.auto_augment_options,
            random_erasing=cfg.random_erasing,
        )
        dataset = builder(split=split, root=cfg.root, transform=transform, **cfg.options)
    return ClassSubset(dataset, cfg.classes) if cfg.classes is not None else dataset


def check_data_options(cfg: DataCfg) -> Mapping[str, inspect.Parameter]:
    """The parameters of ``data.name``'s builder (an unknown name is the registry's UserError), with every key of
    ``data.options`` checked to be one of them; nothing is read."""
    params = inspect.signature(DATASETS.get(cfg.name)).parameters
    reserved = ("split", "root", "transform", "augment", "flip", "mean", "std")
    known = [p for p in params if p not in reserved]
    for key in cfg.options:
        if key not in known:
            raise UserError(
                f"unknown option data.options.{key} for data set {cfg.name!r}; known: {', '.join(known) or 'none'}"
            )
    return params


def _refuse_image_only_augmentation(cfg: DataCfg) -> None:
    """data.auto_augment and data.random_erasing change only the image: refused for the data sets that augment their
    images together with their targets (dense maps, positions), which these would not move along."""
    keys = [k for k, on in (("auto_augment", cfg.auto_augment), ("random_erasing", cfg.random_erasing)) if on]
    if keys:
        raise UserError(
            f"data.{keys[0]} changes the images but not the targets of data set {cfg.name!r}, which augments images "
            f"and targets together itself; use it with data sets that take a transform (folder, fashion_mnist, "
            f"mnist, cifar10/100, captcha_chars, shapes), or set data.auto_augment: null and data.random_erasing: 0"
        )


def build_data(
    cfg: Config, device: torch.device
) -> Tuple[Dict[str, Task], Dict[str, Dataset], Dict[str, DataLoader], torch.Generator, Dict[str, Any]]:
    """Tasks (class counts checked against the data), data sets, loaders, the shuffling generator, data info.

    Under torchrun, process 0 builds first (it may write caches that the others then read), and
    ``data.batch_size`` is the global batch, split evenly over the processes.
    """
    world = dist.world_size()
    data = [c.data for c in task_configs(cfg).values()] or [cfg.data]
    for size in (s for d in data for s in (d.batch_size, d.val_batch_size or d.batch_size)):
        if size % world:
            raise UserError(
                f"data.batch_size {size} does not split over {world} processes; under torchrun it is "
                f"the global batch, so use a multiple of {world}"
            )
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


def _build_data(
    cfg: Config, device: torch.device
) -> Tuple[Dict[str, Task], Dict[str, Dataset], Dict[str, Any], torch.Generator, Dict[str, Any]]:
    if cfg.multi_input:
        return _build_inputs(cfg, device)
    datasets, skipped = _split_datasets(cfg)
    train_ds = datasets["train"]
    classes = list(getattr(train_ds, "classes", []))
    tasks = build_tasks(cfg, dataset_targets(train_ds))
    if cfg.data.labels_per_class:
        datasets["train"] = subset_per_class(train_ds, cfg.data.labels_per_class, cfg.train.seed)
    generator = torch.Generator()
    info = {"classes": classes, "skipped_images": skipped, **{f"{s}_size": len(ds) for s, ds in datasets.items()}}
    shift = _input_shift(cfg, tasks)
    loaders = _batched_loaders(cfg, tasks, datasets, device, generator, info, shift)
    if loaders is None:
        common = dict(
            num_workers=cfg.data.num_workers,
            pin_memory=device.type == "cuda",
            collate_fn=shifted_collate(collate_targets({t: task.target for t, task in tasks.items()}), shift),
            worker_init_fn=ignore_stop_signals,
        )
        loaders = {split: _item_loader(cfg, ds, split == "train", generator, common) for split, ds in datasets.items()}
        info["pipeline"] = "per item"
    return tasks, datasets, loaders, generator, info


def _input_shift(cfg: Config, tasks: Dict[str, Task]) -> Optional[Shift]:
    """``data.shift`` as a function of the input batches (after the pipeline's transforms), or None; refused for
    tasks with dense targets, which it would not move along with the images."""
    d = cfg.data
    dense = [t for t, task in tasks.items() if task.dense]
    if d.shift is not None and dense:
        raise UserError(
            f"data.shift moves the pixels of the images but not the dense targets of task {dense[0]} "
            f"({tasks[dense[0]].type_name}); use it with image-level tasks only, or set data.shift: null"
        )
    return build_shift(d.shift, d.mean, d.std)


def _build_inputs(
    cfg: Config, device: torch.device
) -> Tuple[Dict[str, Task], Dict[str, Any], Dict[str, MultiInputLoader], torch.Generator, Dict[str, Any]]:
    """A multi-input run's data: each task's built as a one-task run of its own (``task_configs``), and per split one
    loader that draws a batch of every task (``MultiInputLoader``). ``datasets``: {split: {task: data set}}; ``info``
    sums the sizes and keeps each task's own under ``inputs``."""
    tasks: Dict[str, Task] = {}
    per_split: Dict[str, Dict[str, Any]] = {}
    datasets: Dict[str, Dict[str, Dataset]] = {}
    generators, inputs = {}, {}
    own_shift = [name for name, task in cfg.tasks.items() if "shift" in (task.data or {})]
    if own_shift:  # one shift for every input keeps mtl predict (one input for all tasks) right
        raise UserError(
            f"tasks.{own_shift[0]}.data.shift: a multi-input run shifts the images of every task alike; "
            f"set data.shift at the top level instead"
        )
    for name, one in task_configs(cfg).items():
        own_tasks, own_datasets, own_loaders, generators[name], own_info = _build_data(one, device)
        tasks.update(own_tasks)
        for split, loader in own_loaders.items():
            per_split.setdefault(split, {})[name] = loader
            datasets.setdefault(split, {})[name] = own_datasets[split]
        inputs[name] = {"data": one.data.name, **own_info}
    partial = [split for split, loaders in per_split.items() if len(loaders) < len(tasks)]
    if partial:
        given = ", ".join(t for t in tasks if t in per_split[partial[0]])
        raise UserError(
            f"the data of tasks {given} has a {partial[0]} split and the others' not; set data.test_split for "
            f"every task or for none"
        )
    generator = torch.Generator()  # the trainer's: re-seeded each epoch, it seeds every task's own
    loaders = {
        split: MultiInputLoader(own, generator if split == "train" else None, generators)
        for split, own in per_split.items()
    }
    info: Dict[str, Any] = {
        "inputs": inputs,
        "classes": {name: own["classes"] for name, own in inputs.items()},
        "skipped_images": sum(own["skipped_images"] for own in inputs.values()),
        "pipeline": "; ".join(f"{name}: {own['pipeline']}" for name, own in inputs.items()),
        **{f"{split}_size": sum(own[f"{split}_size"] for own in inputs.values()) for split in loaders},
    }
    return tasks, datasets, loaders, generator, info


def _split_datasets(cfg: Config) -> Tuple[Dict[str, Dataset], int]:
    """The data sets of the splits train, val and (with data.test_split) test, and how many unreadable images they
    skipped. A fraction data.val_split is carved from the training split (seeded by data.split_seed) with evaluation
    transforms. A validation split that holds the test images warns; validation and test holding the same images is
    refused."""
    d = cfg.data
    train_ds = build_dataset(d, d.train_split, train=True)
    datasets: Dict[str, Dataset] = {"train": train_ds}
    carved = isinstance(d.val_split, float)
    if carved:
        eval_view = build_dataset(d, d.train_split, train=False)
        datasets["train"], datasets["val"] = carve_validation(train_ds, eval_view, d.val_split, d.split_seed)
    else:
        datasets["val"] = build_dataset(d, d.val_split, train=False)
    skipped = sum(len(getattr(ds, "skipped", [])) for ds in (train_ds, *([] if carved else [datasets["val"]])))
    if d.test_split is not None:
        datasets["test"] = build_dataset(d, d.test_split, train=False)
        skipped += len(getattr(datasets["test"], "skipped", []))
        if not carved and same_items(datasets["val"], datasets["test"]):
            raise UserError(
                f"data.test_split {d.test_split!r} holds the same images as data.val_split {d.val_split!r} (data set "
                f"{d.name!r} reads one for the other): the checkpoint would be selected and reported on one split; "
                f"carve validation from training data with data.val_split: 0.1, or set data.test_split: null"
            )
    elif selects_on_test(d.name, d.val_split) and not isinstance(getattr(train_ds, "targets", None), dict):
        fix = (
            "measure on held-out training images with data.val_split=0.1"
            if cfg.continual.methods
            else "select on a carved validation set and report test once with data.val_split=0.1 data.test_split=test"
        )
        if dist.is_main():
            warnings.warn(
                f"data.val_split {d.val_split!r} of {d.name} is its test split: the best epoch is selected on the "
                f"test images, so the reported accuracy is optimistic; {fix}",
                stacklevel=2,
            )
    return datasets, skipped


def _item_loader(
    cfg: Config, dataset: Dataset, train: bool, generator: torch.Generator, common: Dict[str, Any]
) -> SignalSafeLoader:
    """The per-item loader of one split: shuffled by ``generator`` for training; under torchrun, this process's
    share of each global batch."""
    batch = cfg.data.batch_size if train else cfg.data.val_batch_size or cfg.data.batch_size
    if dist.world_size() == 1:
        return SignalSafeLoader(
            dataset, batch_size=batch, shuffle=train, generator=generator if train else None, **common
        )
    sampler = StridedBatchSampler(
        len(dataset), batch, train, generator if train else None, dist.rank(), dist.world_size()
    )
    return SignalSafeLoader(dataset, batch_sampler=sampler, **common)


def _batched_loaders(
    cfg: Config,
    tasks: Dict[str, Task],
    datasets: Dict[str, Dataset],
    device: torch.device,
    generator: torch.Generator,
    info: Dict[str, Any],
    shift: Optional[Shift] = None,
) -> Optional[Dict[str, DeviceBatches]]:
    """Device-augmented batches from decoded image stores (``data.pipeline``), or None for the per-item path;
    ``shift`` (``data.shift``) maps their images. The training split's store holds ``cache_size``² squares that
    the device crops; every other split (only evaluated) holds each item's evaluation view, the per-item eval
    transform's own uint8 pixels, so that evaluation is the same whichever pipeline runs."""
    d = cfg.data
    if d.pipeline == "items":
        return None
    targets = {task.target for task in tasks.values()}
    size = d.cache_size or round(d.resize_size * 4 / 3)
    cache_dir = _cache_dir(d)
    stores = {}
    decoded: Dict[Any, Any] = {}  # the same files decoded the same way are decoded once
    if targets == {"label"}:
        for split, ds in datasets.items():
            stores[split] = image_store(
                ds,
                cache_size=size,
                cache_dir=cache_dir,
                budget_bytes=int(d.cache_budget_gb * 2**30),
                progress=cfg.train.progress,
                decoded=decoded,
                view=None if split == "train" else (d.image_size, d.resize_size),
            )
    if (not stores or any(s is None for s in stores.values())) and all(can_gather(ds) for ds in datasets.values()):
        return _dense_batches(cfg, tasks, datasets, device, generator, info, shift)
    if not stores or any(s is None for s in stores.values()):
        if d.pipeline == "batched":
            raise UserError(
                f"data.pipeline=batched needs a single-label image data set (folder, fashion_mnist, mnist, "
                f"cifar10/100, captcha_chars, shapes) or scenes, multi_fashion, celeba; {d.name!r} "
                f"with targets {', '.join(sorted(targets))} "
                f"has no image store; use data.pipeline=items or auto"
            )
        return None
    kw = dict(image_size=d.image_size, resize_size=d.resize_size, crop_padding=d.crop_padding, mean=d.mean, std=d.std)
    train_kw = dict(
        augment=d.augment,
        flip=d.flip,
        auto_augment=d.auto_augment,
        auto_augment_options=d.auto_augment_options,
        random_erasing=d.random_erasing,
    )
    names = list(tasks)
    shard = dict(rank=dist.rank(), world=dist.world_size())
    loaders = {
        split: DeviceBatches(
            stores[split],
            BatchAugment(train=True, **train_kw, **kw)
            if split == "train"
            else BatchAugment(train=False, augment="none", **kw),
            batch_size=d.batch_size if split == "train" else d.val_batch_size or d.batch_size,
            shuffle=split == "train",
            device=device,
            generator=generator if split == "train" else None,
            target_names=names,
            dataset=ds,
            collate_fn=shifted_collate(collate_targets({t: task.target for t, task in tasks.items()}), shift),
            shift=shift,
            **shard,
        )
        for split, ds in datasets.items()
    }
    images = {s.images.untyped_storage().data_ptr(): s for s in stores.values()}.values()  # shared ones counted once
    nbytes = sum(s.nbytes for s in images if s.location == "memory")
    where = sorted({s.location for s in stores.values() if s.location != "memory"})
    info["pipeline"] = (
        "batched on "
        + device.type
        + f", uint8 images {nbytes / 2**20:,.0f} MiB in memory"
        + (f" + memory-mapped {', '.join(where)}" if where else "")
    )
    for split, st in stores.items():
        info[f"{split}_size"] = len(st)
        info["skipped_images"] += st.dropped
    return loaders


def _cache_dir(d: DataCfg) -> Optional[Path]:
    """Where decoded images that exceed the memory budget go: data.cache_dir, else <data.root>/.mtl_cache."""
    return Path(d.cache_dir).expanduser() if d.cache_dir else default_cache_dir(d.root)


def _dense_batches(
    cfg: Config,
    tasks: Dict[str, Task],
    datasets: Dict[str, Dataset],
    device: torch.device,
    generator: torch.Generator,
    info: Dict[str, Any],
    shift: Optional[Shift] = None,
) -> Dict[str, DenseBatches]:
    """Whole batches gathered by the data set itself (in-memory multitask sets), augmented on the device."""
    d, shard = cfg.data, dict(rank=dist.rank(), world=dist.world_size())
    targets = {t: task.target for t, task in tasks.items()}
    info["pipeline"] = f"batched on {device.type} (the data set's in-memory tensors)"
    if callable(getattr(datasets["train"], "prepare", None)):  # image files: decoded once first (celeba)
        kw = dict(
            cache_size=d.cache_size,
            cache_dir=_cache_dir(d),
            budget_bytes=int(d.cache_budget_gb * 2**30),
            progress=cfg.train.progress,
        )
        where = {ds.prepare(**kw) for ds in datasets.values()}
        mib = sum(ds.nbytes for ds in datasets.values()) / 2**20
        info["pipeline"] = (
            f"batched on {device.type} (images decoded once: uint8 {mib:,.0f} MiB "
            + ("in memory" if where == {"memory"} else "memory-mapped")
            + ")"
        )
    return {
        split: DenseBatches(
            ds,
            targets,
            batch_size=d.batch_size if split == "train" else d.val_batch_size or d.batch_size,
            shuffle=split == "train",
            device=device,
            augment=split == "train" and bool(getattr(ds, "augment", False)),
            generator=generator if split == "train" else None,
            collate_fn=shifted_collate(collate_targets({t: task.target for t, task in tasks.items()}), shift),
            shift=shift,
            **shard,
        )
        for split, ds in datasets.items()
    }


def tasks_from_config(cfg: Config) -> Tuple[Dict[str, Task], Optional[List[int]]]:
    """The config's tasks, completed from the training data when the config does not give every output size, and
    the (H, W) of that data's images (None when no data was needed; a multi-input config's: the first task's)."""
    if cfg.multi_input:  # every task from its own data
        tasks: Dict[str, Task] = {}
        size = None
        for one in task_configs(cfg).values():
            own, own_size = tasks_from_config(one)
            tasks.update(own)
            size = size or own_size
        return tasks, size
    declared = config_targets(cfg)
    if declared is not None:
        return build_tasks(cfg, declared), None
    try:
        train_ds = build_dataset(cfg.data, cfg.data.train_split, train=False)
    except UserError as e:
        missing = [n for n, tc in cfg.tasks.items() if tc.num_classes is None] or ["label"]
        raise UserError(
            f"{e}; or, to build the model without data, give the class count: "
            + " ".join(f"tasks.{n}.num_classes=N" for n in missing)
        ) from None
    size = list(train_ds[0]["image"].shape[-2:]) if len(train_ds) else None  # eval transform: the model's input
    return build_tasks(cfg, dataset_targets(train_ds)), size
