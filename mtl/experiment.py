"""Build a run from a config and execute it: data, model, optimizer, hooks, run directory, summary."""
from __future__ import annotations

import inspect
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from .checkpoint import load_checkpoint, save_json
from .config import Sources, record_sources, build_config, config_to_dict, deep_merge, dump_config
from .data import DATASETS, build_transforms, subset_per_class
from .encoders import build_encoder
from .errors import UserError
from .freezing import L2SP, apply_freeze
from .heads import HEADS
from .hooks import CheckpointHook, ConsoleHook, MetricsFileHook, TensorBoardHook, UnfreezeHook
from .model import TransferModel
from .optim import build_optimizer, build_scheduler
from .schema import Config, DataCfg
from .tasks import Task, build_task
from .trainer import Trainer


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
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA GPU is available; use train.device=auto or cpu")
    return torch.device(name)


def use_amp(mode: str, device: torch.device) -> bool:
    if mode == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "bf16"


def build_dataset(cfg: DataCfg, split: str, train: bool) -> Dataset:
    """A registered data set with the config's transforms; unknown options are a clear error."""
    builder = DATASETS.get(cfg.name)
    known = [p for p in inspect.signature(builder).parameters if p not in ("split", "root", "transform")]
    for key in cfg.options:
        if key not in known:
            raise UserError(f"unknown option data.options.{key} for data set {cfg.name!r}; known: {', '.join(known) or 'none'}")
    transform = build_transforms(train=train, image_size=cfg.image_size, resize_size=cfg.resize_size,
                                 mean=cfg.mean, std=cfg.std, augment=cfg.augment, crop_padding=cfg.crop_padding)
    return builder(split=split, root=cfg.root, transform=transform, **cfg.options)


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
    l2sp: Optional[L2SP] = None
    info: Dict[str, Any] = field(default_factory=dict)


def build_experiment(cfg: Config) -> Experiment:
    """Data sets, tasks (class counts checked against the data), model with weights and freezing, loaders."""
    seed_everything(cfg.train.seed, cfg.train.deterministic)
    device = select_device(cfg.train.device)
    train_ds = build_dataset(cfg.data, cfg.data.train_split, train=True)
    val_ds = build_dataset(cfg.data, cfg.data.val_split, train=False)
    classes = list(getattr(train_ds, "classes", []))
    skipped = len(getattr(train_ds, "skipped", [])) + len(getattr(val_ds, "skipped", []))
    if cfg.data.labels_per_class:
        train_ds = subset_per_class(train_ds, cfg.data.labels_per_class, cfg.train.seed)

    tasks: Dict[str, Task] = {}
    for name, tc in cfg.tasks.items():
        n = tc.num_classes if tc.num_classes is not None else len(classes)
        if classes and tc.num_classes is not None and tc.num_classes != len(classes):
            raise UserError(f"tasks.{name}.num_classes is {tc.num_classes} but the data has {len(classes)} classes "
                            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''}); fix num_classes or remove it")
        if tc.type == "binary" and n != 2:
            raise UserError(f"tasks.{name} is binary but the data has {n} classes; use type: classification")
        if n < 1:
            raise UserError(f"tasks.{name}: cannot tell the number of classes; set tasks.{name}.num_classes")
        tasks[name] = build_task(name, type=tc.type, target=tc.target, num_classes=n, weight=tc.weight,
                                 classes=classes, label_smoothing=tc.label_smoothing)

    encoder = build_encoder(cfg.model.encoder, weights=cfg.model.weights, **cfg.model.encoder_options)
    l2sp = L2SP(encoder, cfg.optim.l2sp) if cfg.optim.l2sp > 0 else None
    apply_freeze(encoder, cfg.model.freeze)
    heads = {}
    for name, task in tasks.items():
        head_cfg = cfg.tasks[name].head
        heads[name] = HEADS.get(head_cfg.name)(in_dim=encoder.out_dim, out_dim=task.out_dim,
                                               hidden=head_cfg.hidden, dropout=head_cfg.dropout)
    model = TransferModel(encoder, heads).to(device)
    if l2sp is not None:
        l2sp.start = {k: v.to(device) for k, v in l2sp.start.items()}

    generator = torch.Generator()
    common = dict(num_workers=cfg.data.num_workers, pin_memory=device.type == "cuda", collate_fn=_collate(tasks))
    loaders = {
        "train": DataLoader(train_ds, batch_size=cfg.data.batch_size, shuffle=True, generator=generator, **common),
        "val": DataLoader(val_ds, batch_size=cfg.data.val_batch_size or cfg.data.batch_size, shuffle=False, **common),
    }
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    info = {"classes": classes, "skipped_images": skipped, "train_size": len(train_ds), "val_size": len(val_ds),
            "params": {"total": n_params, "trainable": n_train, "frozen": n_params - n_train}}
    return Experiment(cfg, model, tasks, {"train": train_ds, "val": val_ds}, loaders, device, generator, l2sp, info)


def new_run_dir(cfg: Config) -> Path:
    """``<out_dir>/<name>/<timestamp>``, never reusing an existing directory."""
    base = Path(cfg.out_dir) / cfg.name / datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir, i = base, 1
    while run_dir.exists():
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    return run_dir


def run(cfg: Config, run_dir: Optional[Path] = None, resume: bool = False, quiet: bool = False) -> Dict[str, Any]:
    """Train one config into ``run_dir`` (new if None) and write its summary; returns the summary."""
    started = time.perf_counter()
    exp = build_experiment(cfg)
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        dump_config(cfg, run_dir / "config.yaml")
    optimizer = build_optimizer(exp.model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.sched, cfg.train.epochs, len(exp.loaders["train"]))
    classes = {t: task.classes for t, task in exp.tasks.items()}
    meta = {"config": config_to_dict(cfg), "classes": classes, "encoder": cfg.model.encoder}
    hooks = [
        UnfreezeHook(exp.model.encoder, cfg.train.unfreeze, cfg.optim),
        MetricsFileHook(run_dir),
        TensorBoardHook(run_dir, hparams=_hparams(cfg), classes=classes, mean=cfg.data.mean, std=cfg.data.std,
                        n_images=cfg.train.log_images),
        CheckpointHook(run_dir, meta),
    ]
    if not quiet:
        hooks.append(ConsoleHook())
    trainer = Trainer(exp.model, exp.tasks, exp.loaders, optimizer, scheduler, epochs=cfg.train.epochs,
                      device=exp.device, amp=use_amp(cfg.train.amp, exp.device), grad_clip=cfg.train.grad_clip,
                      l2sp=exp.l2sp, hooks=hooks, progress=cfg.train.progress and not quiet, seed=cfg.train.seed,
                      generator=exp.generator)
    if resume:
        trainer.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "last.pt"))
    if not quiet:
        p = exp.info["params"]
        print(f"run {run_dir}  |  {cfg.model.encoder} on {cfg.data.name}: {exp.info['train_size']} train / "
              f"{exp.info['val_size']} val images, {len(exp.info['classes'])} classes  |  params {p['total']:,} "
              f"({p['trainable']:,} trainable)  |  device {exp.device}"
              + (f"  |  skipped {exp.info['skipped_images']} unreadable images" if exp.info["skipped_images"] else ""))
    history = trainer.fit()
    summary = _summary(cfg, run_dir, trainer, exp, history, time.perf_counter() - started)
    save_json(summary, run_dir / "summary.json")
    return summary


def _hparams(cfg: Config) -> Dict[str, Any]:
    return {"encoder": cfg.model.encoder, "weights": str(cfg.model.weights), "freeze": str(cfg.model.freeze),
            "optimizer": cfg.optim.name, "lr": cfg.optim.lr, "schedule": cfg.sched.name,
            "batch_size": cfg.data.batch_size, "epochs": cfg.train.epochs, "data": cfg.data.name}


def _summary(cfg: Config, run_dir: Path, trainer: Trainer, exp: Experiment, history: List[Dict[str, Any]],
             total_s: float) -> Dict[str, Any]:
    epoch_s = [m["time_s"] for m in history]
    best = history[trainer.best["epoch"] - 1] if trainer.best["epoch"] else {}
    return {
        "name": cfg.name,
        "run_dir": str(run_dir),
        "epochs": trainer.epoch,
        "best": {"epoch": trainer.best["epoch"], "val": best.get("val"), "train": best.get("train")},
        "final": {"epoch": history[-1]["epoch"], "val": history[-1].get("val"), "train": history[-1]["train"]} if history else None,
        "time": {"total_s": total_s, "epoch_s": epoch_s, "mean_epoch_s": sum(epoch_s) / max(len(epoch_s), 1),
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
        patch = {k: v for k, v in stage.items() if k != "name"}
        stage_sources = dict(sources)
        record_sources(stage_sources, [], patch, f"{sources.get(('stages',), 'the config')}, stage {stage['name']!r}")
        cfg = build_config(deep_merge(base, patch), stage_sources)
        cfg.name = stage["name"]
        configs.append(cfg)
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
    root.mkdir(parents=True)
    dump_config(top, root / "config.yaml")
    summaries, dirs = [], {}
    for i, cfg in enumerate(configs):
        if cfg.model.weights and cfg.model.weights.startswith("stage:"):
            cfg.model.weights = f"run:{dirs[cfg.model.weights[6:]]}"
        cfg.out_dir = str(root)
        print(f"\n=== stage {i + 1}/{len(configs)}: {cfg.name} ===")
        dirs[cfg.name] = root / cfg.name
        summaries.append(run(cfg, dirs[cfg.name]))
    table = stage_table(summaries)
    print("\n" + table)
    (root / "results.md").write_text(table + "\n")
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
    from .config import load_config

    raw, sources = load_config(path, overrides)
    top = build_config(raw, sources)
    if top.stages:
        return run_stages(top, stage_configs(raw, sources))
    return [run(top)]


def resume_run(run_dir: str) -> Dict[str, Any]:
    """Continue a run from ``<run_dir>/checkpoints/last.pt`` with its saved config."""
    from .config import load_config

    d = Path(run_dir)
    if not (d / "config.yaml").is_file() or not (d / "checkpoints" / "last.pt").is_file():
        raise UserError(f"cannot resume {d}: it needs config.yaml and checkpoints/last.pt (is it a run directory?)")
    raw, sources = load_config(d / "config.yaml")
    return run(build_config(raw, sources), d, resume=True)
