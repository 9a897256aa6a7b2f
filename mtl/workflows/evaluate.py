"""``mtl eval``: every task's metrics and the confusion matrices of a run's best checkpoint on one split."""

from __future__ import annotations

import copy
import json
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torchvision.transforms.v2.functional import to_pil_image

from mtl.build.data import build_data
from mtl.config.load import task_configs
from mtl.config.schema import DataCfg
from mtl.core.checkpoint import save_json
from mtl.core.errors import UserError
from mtl.core.runtime import select_device, use_amp
from mtl.engine.evaluate import evaluate
from mtl.engine.visualize import confusion_image, confusion_text, text_table
from mtl.tasks.base import Task
from mtl.workflows.predict import open_run


def _split_loader(
    cfg: Any, split: str, device: torch.device, task_splits: Optional[Mapping[str, Any]] = None
) -> tuple[Dict[str, Task], Any]:
    """Tasks and the loader of ``split`` as the run validated: the run's data pipeline with eval transforms.

    ``build_data`` with both of its splits set to ``split``: no other split is listed or decoded (``split`` is
    built twice, as the unused training split too, whose batched store is then decoded at 1 px: ``cache_size`` 1).
    The evaluated split is the batched pipeline's evaluation views, the per-item eval transform's own pixels, as
    ``mtl predict`` reads the files, whatever ``--split`` names (``train`` too). ``split`` a fraction
    (``data.val_split``): the run's own validation set, carved from the training split again. A multi-input run:
    each task's data on its own split (``task_splits``).
    """

    eval_cfg = copy.deepcopy(cfg)
    for key, value in _only(split).items():
        setattr(eval_cfg.data, key, value)
    for t, own in (task_splits or {}).items():
        eval_cfg.tasks[t].data.update(_only(own))
    with warnings.catch_warnings():  # scoring a test split on request selects nothing on it
        warnings.filterwarnings("ignore", message="data.val_split .* is its test split")
        tasks, _, loaders, _, _ = build_data(eval_cfg, device)
    return tasks, loaders["val"]


def _only(split: Any) -> Dict[str, Any]:
    """The data keys that make ``split`` the validation split and nothing else (a fraction: the carved set)."""
    keys: Dict[str, Any] = {"labels_per_class": None, "test_split": None, "cache_size": 1}
    if not isinstance(split, float):  # a fraction: the validation set the run carved (data.split_seed)
        keys["train_split"] = keys["val_split"] = split
    return keys


def _data_split(d: DataCfg, split: str) -> Any:
    """The split of data ``d`` that ``--split`` names: val, train and test as the run used them, else itself."""
    return {"val": d.val_split, "train": d.train_split, "test": d.test_split or "test"}.get(split, split)


def _check_classes(run_classes: Mapping[str, List[str]], data_tasks: Mapping[str, Task], split: str) -> None:
    for t, task in data_tasks.items():
        saved = list(run_classes.get(t) or [])
        if saved and task.classes and list(task.classes) != saved:
            raise UserError(
                f"the classes of task {t} in split {split!r} ({', '.join(task.classes[:8])}) differ from the "
                f"run's ({', '.join(saved[:8])}); the checkpoint cannot be scored on this data"
            )


def _best_epoch(run_dir: Path) -> int:
    """The best epoch from summary.json (the TensorBoard step of the eval scalars), 0 when unknown."""
    try:
        return int(json.loads((run_dir / "summary.json").read_text())["best"]["epoch"] or 0)
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def eval_command(run: str, split: str = "val") -> str:
    """Score ``run``'s best checkpoint on ``split``; write ``eval/<split>/`` and TensorBoard; return a report."""
    from torch.utils.tensorboard import SummaryWriter

    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", split or ""):
        raise UserError(f"--split must be a split name such as val, train or test, got {split!r}")
    loaded = open_run(run)
    run_dir = Path(loaded.run_dir)
    cfg = loaded.cfg
    data_split = _data_split(cfg.data, split)
    task_splits = {t: _data_split(one.data, split) for t, one in task_configs(cfg).items()}  # multi-input
    device = select_device("auto")
    data_tasks, loader = _split_loader(cfg, data_split, device, task_splits)
    _check_classes(loaded.classes, data_tasks, split)
    amp = use_amp(cfg.train.amp, device)
    model = loaded.model.to(device)
    result = evaluate(
        model,
        loader,
        loaded.tasks,
        device,
        autocast=(lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None,
        progress=None if len(loader) > 1 else False,  # a bar on a terminal only, never in a redirected log
    )
    if result.size == 0:
        raise UserError(f"split {split!r} of {run_dir} has no images to evaluate")

    out_dir = run_dir / "eval" / split
    out_dir.mkdir(parents=True, exist_ok=True)
    report: Dict[str, Any] = {
        "run_dir": str(run_dir),
        "split": split,
        "data_split": task_splits or data_split,
        "size": result.size,
        "checkpoint": "checkpoints/best.pt",
        **result.overall,
        "tasks": result.metrics,
    }
    report["confusion"] = {
        t: {"classes": _names(loaded.tasks[t], c.shape[0]), "matrix": c.tolist()} for t, c in result.confusion.items()
    }
    step = _best_epoch(run_dir)
    writer = SummaryWriter(log_dir=str(run_dir), filename_suffix=f".eval_{split}")
    written = [out_dir / "metrics.json"]
    try:
        for t, values in result.metrics.items():
            for metric, value in values.items():
                writer.add_scalar(f"eval/{split}/{t}/{metric}", value, step)
        for t, c in result.confusion.items():
            image = confusion_image(
                c, report["confusion"][t]["classes"], f"{t} on {split}: rows true, columns predicted"
            )
            to_pil_image(image).save(out_dir / f"confusion_{t}.png")
            written.append(out_dir / f"confusion_{t}.png")
            writer.add_image(f"eval/{split}/confusion_{t}", image, step)
    finally:
        writer.close()
    save_json(report, out_dir / "metrics.json")

    lines = [f"{run_dir}: best checkpoint on split {split!r} ({result.size} images)"]
    rows = [["task", "metric", "value"]] + [[t, k, f"{v:.4f}"] for t, m in result.metrics.items() for k, v in m.items()]
    lines.append(text_table(rows, right=[2]))
    if "acc" in report and len(result.metrics) > 1:
        lines.append(f"mean acc {report['acc']:.4f}")
    for t, c in result.confusion.items():
        lines += [
            "",
            f"confusion matrix of {t} (rows: true class, columns: predicted)",
            confusion_text(c, report["confusion"][t]["classes"]),
        ]
    lines += ["", f"wrote {', '.join(str(p) for p in written)}; TensorBoard eval/{split}/* in {run_dir}"]
    return "\n".join(lines)


def _names(task: Task, n: int) -> List[str]:
    classes = list(task.classes)
    return classes if len(classes) == n else [str(i) for i in range(n)]
