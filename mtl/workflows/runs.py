"""Models from a config file or a finished run, for looking inside them (summary, features, predict, eval)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
from torch import nn
from torchvision.transforms import v2

from mtl.build.data import tasks_from_config
from mtl.build.model import build_model, config_encoder
from mtl.build.tasks import build_tasks, tasks_from_targets
from mtl.config.load import build_config, load_config
from mtl.config.schema import Config
from mtl.config.stages import select_stage, stage_configs
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules
from mtl.data.image_files import load_rgb
from mtl.data.shift import build_shift
from mtl.data.transforms import build_transforms
from mtl.models.freezing import apply_freeze
from mtl.tasks.base import Task
from mtl.workflows.continual import as_sequence_stage, stage_model, stage_model_task


@dataclass
class Loaded:
    """A model built from a config (random or configured weights) or a run (its checkpoint)."""

    cfg: Config
    model: nn.Module
    tasks: Dict[str, Task]
    run_dir: Optional[Path] = None  # set when loaded from a run
    classes: Dict[str, List[str]] = field(default_factory=dict)
    input_size: Optional[List[int]] = None  # (H, W) the run's model saw, for data sets that size their own images
    notes: List[str] = field(default_factory=list)  # how it was built, when not as the target alone says (a stage)


def is_run_dir(target: str | Path) -> bool:
    return Path(target).is_dir() and (Path(target) / "config.yaml").is_file()


def load_model(
    target: str | Path,
    overrides: Sequence[str] = (),
    *,
    weights: bool = True,
    checkpoint: str = "best",
    stage: Optional[str] = None,
    any_stage: bool = False,
) -> Loaded:
    """The model of a config file, or of a run directory with ``checkpoints/<checkpoint>.pt`` loaded.

    From a config: ``weights=False`` builds the architecture only (no download); tasks whose class count the
    config does not give are completed from the training data set (listed, not decoded).

    A config with stages (or a staged run's root) is refused unless ``stage`` names a stage or ``any_stage`` is
    set, which takes the last stage when ``stage`` is None: that stage's config (architecture only, and refused
    with ``weights``, when it starts from another stage's trained weights, ``stage:<name>``) or its run directory.
    """

    path = Path(target)
    run = is_run_dir(path)
    if not run and path.is_dir():
        raise UserError(f"{path} is a folder without config.yaml; give a config file or a run directory")
    ckpt = path / "checkpoints" / f"{checkpoint}.pt"
    state = load_checkpoint(ckpt) if run and ckpt.is_file() else None
    if state is not None and "method" in state:  # one task's run inside a continual run
        return _continual_stage(path, state)
    raw, sources = load_config(path / "config.yaml" if run else path, list(overrides))
    import_config_modules(raw)
    cfg = build_config(raw, sources)
    if stage is not None and (not cfg.stages or cfg.continual.methods):
        what = "runs a continual sequence (continual.methods)" if cfg.continual.methods else "has no stages"
        raise UserError(f"--stage {stage}: {path} {what}; --stage picks a stage of a config with stages")
    if cfg.continual.methods and (not run or (not weights and state is None)):  # a run's root: its architecture
        return _continual_config(raw, sources, cfg, path)
    if cfg.stages and not cfg.continual.methods and (stage is not None or any_stage):
        if run:  # the stage's own run directory
            name = select_stage(stage_configs(raw, sources), stage).name
            if not is_run_dir(path / name):
                raise UserError(
                    f"stage {name} of {path} has not run yet ({path / name / 'config.yaml'} is missing); finish the "
                    f"run with mtl train --resume {path}, or pick another --stage"
                )
            return load_model(path / name, overrides, weights=weights, checkpoint=checkpoint)
        return _stage_config(raw, sources, cfg, stage, weights)
    if cfg.stages or cfg.continual.methods:
        subdir = "<method>/<task>" if cfg.continual.methods else "<stage>"
        where = path if run else Path(cfg.out_dir) / cfg.name / "<time>"
        raise UserError(
            f"{path} runs stages ({', '.join(str(st.get('name')) for st in cfg.stages)}); give one "
            f"stage's run directory, {where}/{subdir}"
        )
    if run and state is None:
        state = load_checkpoint(ckpt)  # says that it is missing
    if state is not None:
        if "targets" in state:
            declared = state["targets"]
        else:  # runs from before task targets were saved: the classes are enough for single-label runs
            classes = next(iter(state.get("classes", {}).values()), [])
            declared = {"label": {"type": "classification", "num_classes": len(classes), "classes": classes}}
        tasks = tasks_from_targets(cfg, declared)
        input_size = state.get("input_size")
    else:
        tasks, input_size = tasks_from_config(cfg)
    encoder = config_encoder(cfg, weights=weights and not run)
    apply_freeze(encoder, cfg.model.freeze)
    model = build_model(cfg, encoder, tasks, input_size, weights=weights and not run)
    if state is not None:
        _load_state(model, state["model"], path)
    model.eval()
    return Loaded(cfg, model, tasks, path if run else None, {t: task.classes for t, task in tasks.items()}, input_size)


def _stage_config(raw: Dict[str, Any], sources: Any, top: Config, name: Optional[str], weights: bool) -> Loaded:
    """Stage ``name`` (the last when None) of the staged config ``top`` (``raw`` as loaded), built as a config of its
    own."""
    stages = stage_configs(raw, sources)
    cfg = select_stage(stages, name)
    notes = []
    if name is None:
        notes.append(f"stage {cfg.name}, the last of {', '.join(c.name for c in stages)} (--stage NAME picks another)")
    start = cfg.model.weights or ""
    if start.startswith("stage:"):
        if weights:
            raise UserError(
                f"stage {cfg.name!r} starts from stage {start[6:]!r}'s trained weights, which the config alone does "
                f"not have; give that stage's run directory, {Path(top.out_dir) / top.name}/<time>/{cfg.name}"
            )
        notes.append(
            f"stage {cfg.name} starts from stage {start[6:]}'s trained weights: shown is its architecture, "
            f"built without them"
        )
        cfg.model.weights = None
    tasks, input_size = tasks_from_config(cfg)
    encoder = config_encoder(cfg, weights=weights)
    apply_freeze(encoder, cfg.model.freeze)
    model = build_model(cfg, encoder, tasks, input_size, weights=weights).eval()
    return Loaded(cfg, model, tasks, None, {t: task.classes for t, task in tasks.items()}, input_size, notes)


def _sequence(raw: Dict[str, Any], sources: Any) -> List[Config]:

    return [as_sequence_stage(c) for c in stage_configs(raw, sources)]


def _continual_config(raw: Dict[str, Any], sources: Any, top: Config, path: Path) -> Loaded:
    """A continual config: the model of its first column method (else of its first method) after the last task."""

    configs = _sequence(raw, sources)
    tasks = [tasks_from_config(c)[0][c.name] for c in configs]
    method = next((m for m in top.continual.methods if m in ("progressive", "independent")), top.continual.methods[0])
    model = stage_model(method, top, configs, tasks, len(configs) - 1).eval()
    last = copy.deepcopy(configs[-1])
    last.name = f"{top.name} ({method}, after {len(configs)} tasks)"
    return Loaded(
        last,
        model,
        {c.name: t for c, t in zip(configs, tasks)},
        None,
        {c.name: t.classes for c, t in zip(configs, tasks)},
    )


def _continual_stage(path: Path, state: Dict[str, Any]) -> Loaded:
    """``<root>/<method>/<task>``: the model ``method`` predicts ``task`` with, its checkpoint loaded."""

    root, method, task = path.parent.parent, state["method"], state["task"]
    if "sequence" not in state:
        raise UserError(
            f"{path}: this continual run was made by an older mtl that did not save its task sequence; "
            "train it again to use it here"
        )
    raw, sources = load_config(root / "config.yaml", [])
    import_config_modules(raw)
    top = build_config(raw, sources)
    configs = _sequence(raw, sources)
    names = [c.name for c in configs]
    if task not in names:
        raise UserError(f"{path}: task {task!r} is not a stage of {root / 'config.yaml'} (stages: {', '.join(names)})")
    k = names.index(task)
    tasks = [build_tasks(c, targets)[c.name] for c, targets in zip(configs[: k + 1], state["sequence"])]
    model, scored = stage_model_task(method, top, configs, tasks, k)
    _load_state(model, state["model"], path)
    # the run's classes are its data's (what mtl eval checks the data against); the scored task names what it predicts
    return Loaded(configs[k], model.eval(), {task: scored}, path, {task: tasks[k].classes})


def _load_state(model: nn.Module, weights: Dict[str, torch.Tensor], path: Path) -> None:
    try:
        model.load_state_dict(weights)
    except RuntimeError as e:
        raise UserError(
            f"{path}: the checkpoint does not fit the model its config builds: {' '.join(str(e).split())[:300]}"
        ) from None


def image_tensor(path: str | Path, cfg: Config, size: Optional[Sequence[int]] = None) -> torch.Tensor:
    """One image file as the model's eval input: Resize + CenterCrop to (S, S) + normalise, as validation; with
    ``size`` (H, W) other than (S, S), a plain resize to it (data sets that render or size their own images). Then
    ``data.shift``, as the run's inputs had it."""

    p = Path(path)
    if not p.is_file():
        raise UserError(f"image {p} does not exist (or is not a file)")
    try:
        image = load_rgb(str(p))
    except Exception as e:  # PIL raises many types
        raise UserError(f"cannot read image {p}: {' '.join(str(e).split())[:160]}") from None
    if size is not None and list(size) != [cfg.data.image_size] * 2:
        transform = v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(list(size), antialias=True),
                v2.RGB(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(cfg.data.mean, cfg.data.std),
            ]
        )
    else:
        transform = build_transforms(
            train=False,
            image_size=cfg.data.image_size,
            resize_size=cfg.data.resize_size,
            mean=cfg.data.mean,
            std=cfg.data.std,
        )
    x = transform(image).unsqueeze(0)
    shift = build_shift(cfg.data.shift, cfg.data.mean, cfg.data.std)
    return x if shift is None else shift(x)
