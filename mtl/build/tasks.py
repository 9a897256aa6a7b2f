"""Tasks from the config and the target specs a data set (or a checkpoint) declares."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List, Optional, Tuple

from torch.utils.data import Dataset

from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.tasks.base import LOSSES, METRICS, Task, add_custom_metrics, build_task, use_custom_loss


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


def task_targets(tasks: Dict[str, Task]) -> Dict[str, Dict[str, Any]]:
    """What the data set declared for each task's target, saved in checkpoints so a run rebuilds without data."""
    out = {}
    for task in tasks.values():
        n = len(task.classes) if task.classes else (task.out_dim if task.needs_num_classes else None)
        info: Dict[str, Any] = {"type": task.type_name, "classes": list(task.classes)}
        if n is not None:
            info["num_classes" if task.type_name != "regression" else "num_outputs"] = n
        out[task.target] = info
    return out


def _tasks_from_config(cfg: Config, build_dataset: Any, build_tasks: Any) -> Tuple[Dict[str, Task], Optional[List[int]]]:
    """The config's tasks, completed from the training data when it does not give every class count, and the
    (H, W) of that data's images (None when no data was needed)."""
    known = all(tc.num_classes is not None or tc.type in ("binary", "depth", "normals") for tc in cfg.tasks.values())
    if known:
        declared = {(tc.target or name): {"type": tc.type or "classification", "num_classes": tc.num_classes}
                    for name, tc in cfg.tasks.items()}
        return build_tasks(cfg, SimpleNamespace(targets=declared), []), None
    try:
        train_ds = build_dataset(cfg.data, cfg.data.train_split, train=False)
    except UserError as e:
        missing = [n for n, tc in cfg.tasks.items() if tc.num_classes is None] or ["label"]
        raise UserError(f"{e}; or, to build the model without data, give the class count: "
                        + " ".join(f"tasks.{n}.num_classes=N" for n in missing)) from None
    size = list(train_ds[0]["image"].shape[-2:]) if len(train_ds) else None  # eval transform: the model's input
    return build_tasks(cfg, train_ds, list(getattr(train_ds, "classes", []))), size
