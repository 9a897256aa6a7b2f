"""Tasks from the config and the target specs a data set (or a checkpoint) declares."""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

from torch.utils.data import Dataset

from mtl.config.load import task_configs
from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.tasks.base import (
    LOSSES,
    METRICS,
    TASK_TYPES,
    Task,
    add_custom_metrics,
    build_task,
    use_custom_loss,
)

TargetSpecs = Dict[str, Dict[str, Any]]  # target key -> {"type", "num_classes" (or the type's outputs_key), "classes"}


def dataset_targets(dataset: Dataset) -> TargetSpecs:
    """The target specs a data set declares: its ``targets`` (multitask sets), or one ``label`` classification
    target with its ``classes`` (single-label sets)."""
    declared = dict(getattr(dataset, "targets", None) or {})
    if declared:
        return declared
    classes = list(getattr(dataset, "classes", []))
    return {"label": {"type": "classification", "num_classes": len(classes), "classes": classes}}


def build_tasks(cfg: Config, declared: Mapping[str, Mapping[str, Any]]) -> Dict[str, Task]:
    """Tasks of the config, completed and checked against the declared target specs (of a data set:
    ``dataset_targets``; of a checkpoint: what ``task_targets`` saved; of a config alone: ``config_targets``)."""
    if cfg.weighting.name == "equal" and any(tc.weight != 1 for tc in cfg.tasks.values()):
        raise UserError(
            "task weights are set but weighting.name is equal, which ignores them; "
            "use weighting.name=static to weight the task losses"
        )
    tasks: Dict[str, Task] = {}
    for name, tc in cfg.tasks.items():
        target = tc.target or (name if name in declared or len(declared) > 1 else "label")
        if target not in declared:
            raise UserError(
                f"tasks.{name}: the data set {cfg.data.name!r} has no target {target!r}; it provides "
                f"{', '.join(declared)}; set tasks.{name}.target to one of them"
            )
        info = declared[target]
        type_ = tc.type or info.get("type", "classification")
        kind = TASK_TYPES.get(type_)
        n_data = info.get("num_classes", info.get(kind.outputs_key))
        names = list(info.get("classes") or [])
        if tc.num_classes is not None and n_data and kind.fixed_outputs is None and tc.num_classes != n_data:
            shown = f" ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})" if names else ""
            raise UserError(
                f"tasks.{name}.num_classes is {tc.num_classes} but the data has {n_data} classes{shown}; "
                f"fix num_classes or remove it"
            )
        n = tc.num_classes if tc.num_classes is not None else n_data
        kind.check_data_classes(name, n)
        options = dict(tc.options)
        custom_loss = tc.loss is not None and tc.loss in LOSSES
        if tc.loss is not None and not custom_loss:
            options["loss"] = tc.loss
        if tc.label_smoothing:
            options["label_smoothing"] = tc.label_smoothing
        try:
            task = build_task(
                name, type=type_, target=target, num_classes=n, weight=tc.weight, classes=names, **options
            )
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
                raise UserError(
                    f"tasks.{name}.metrics: unknown {', '.join(unknown)}; a {type_} task reports "
                    f"{', '.join(k for k in task.metric_directions if k != 'loss')}"
                )
            task.report = list(tc.metrics)
        tasks[name] = task
    return tasks


def task_targets(tasks: Mapping[str, Task]) -> TargetSpecs:
    """What the data set declared for each task's target, saved in checkpoints so a run rebuilds without data."""
    out = {}
    for task in tasks.values():
        n = len(task.classes) if task.classes else (task.out_dim if task.needs_num_classes else None)
        info: Dict[str, Any] = {"type": task.type_name, "classes": list(task.classes)}
        if n is not None:
            info[task.outputs_key] = n
        out[task.target] = info
    return out


def run_targets(cfg: Config, tasks: Mapping[str, Task]) -> Dict[str, Any]:
    """What a checkpoint keeps to rebuild the tasks without data: ``task_targets``, per task in a multi-input run
    (every task has its own data set, whose target keys may coincide, e.g. two ``label``s)."""
    if cfg.multi_input:
        return {name: task_targets({name: task}) for name, task in tasks.items()}
    return task_targets(tasks)


def tasks_from_targets(cfg: Config, saved: Mapping[str, Any]) -> Dict[str, Task]:
    """The tasks of ``cfg`` from what ``run_targets`` saved."""
    if cfg.multi_input:
        return {name: build_tasks(one, saved[name])[name] for name, one in task_configs(cfg).items()}
    return build_tasks(cfg, saved)


def config_targets(cfg: Config) -> Optional[TargetSpecs]:
    """The target specs a config gives alone (every task's output size known: ``num_classes``, or a type that fixes
    it), so that its model builds without data; None when some task needs the data set's class count."""
    if not all(
        tc.num_classes is not None or TASK_TYPES.get(tc.type or "classification").fixed_outputs is not None
        for tc in cfg.tasks.values()
    ):
        return None
    return {
        (tc.target or name): {"type": tc.type or "classification", "num_classes": tc.num_classes}
        for name, tc in cfg.tasks.items()
    }
