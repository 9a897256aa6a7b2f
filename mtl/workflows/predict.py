"""``mtl predict``: a trained run's predictions for image files and folders.

Image-level tasks with classes give their top-k classes with probabilities (softmax; sigmoid for binary and
multilabel tasks), regression tasks their values, dense tasks (segmentation, depth, normals) one overlay PNG
per image. Writes ``predictions.csv`` and an annotated grid ``predictions.png`` to the output folder.
"""

from __future__ import annotations

import csv
import functools
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms.v2.functional import to_pil_image
from tqdm.auto import tqdm

from mtl.core.checkpoint import atomic_write, writing
from mtl.core.errors import UserError
from mtl.core.runtime import select_device
from mtl.data.image_files import is_image_file
from mtl.engine.visualize import text_table, titled_grid
from mtl.tasks.base import Task
from mtl.workflows.runs import Loaded, image_tensor, load_model

BATCH = 32
GRID_IMAGES = 32
OUT_HINT = "--out names another folder"  # after a full disk or a read-only folder


def open_run(run: str | os.PathLike) -> Loaded:
    """The run's model with its best checkpoint, in eval mode; a missing run directory is a UserError."""
    path = Path(run)
    if not path.exists():
        raise UserError(f"run directory {path} does not exist; give a folder such as runs/<name>/<time>")
    if not path.is_dir():
        raise UserError(f"{path} is a file; give a run directory (the folder with config.yaml and checkpoints/)")
    return load_model(path)


def find_images(inputs: Sequence[str]) -> List[Path]:
    """Image files from files and folders (recursively, sorted); a folder without images is a UserError."""

    files: List[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = []
            for root, dirs, names in os.walk(p, followlinks=True):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # no .git, .ipynb_checkpoints, caches
                found += sorted(Path(root) / name for name in names if is_image_file(name))
            if not found:
                raise UserError(f"no image files found in {p} (looked for {_extensions()} in it and its subfolders)")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise UserError(f"{p} does not exist; give image files or folders of images")
    return list(dict.fromkeys(files))


def _extensions() -> str:

    return ", ".join(IMG_EXTENSIONS[:4]) + ", ..."


@dataclass
class _Row:
    path: Path
    cells: Dict[str, str] = field(default_factory=dict)  # task -> table text
    csv: Dict[str, Any] = field(default_factory=dict)  # column -> value
    title: str = ""


def _load_batch(paths: Sequence[Path], loaded: Loaded, skipped: List[str]) -> Tuple[List[Path], Optional[Tensor]]:
    kept, tensors = [], []
    for p in paths:
        try:
            tensors.append(image_tensor(p, loaded.cfg, loaded.input_size))
            kept.append(p)
        except UserError as e:
            skipped.append(str(e))
    return kept, torch.cat(tensors) if tensors else None


def _overlay_name(path: Path, task: str, used: set) -> str:
    stem, i = path.stem, 1
    while f"{stem}_{task}" in used:
        i += 1
        stem = f"{path.stem}-{i}"
    used.add(f"{stem}_{task}")
    return f"{stem}_{task}.png"


def _describe(task: Task, output: Tensor, topk: int) -> List[Tuple[Dict[str, str], Dict[str, Any], str]]:
    """Per image of a batch: table cell, CSV columns and a grid title, for an image-level task."""
    t = task.name
    if not task.has_probabilities:  # regression values
        values = task.predict(output.float()).reshape(output.shape[0], -1).tolist()
        out = []
        for row in values:
            cols = {t: row[0]} if len(row) == 1 else {f"{t}_{i}": v for i, v in enumerate(row)}
            text = " ".join(f"{v:.4g}" for v in row)
            out.append(({t: text}, cols, text))
        return out
    probs = task.probabilities(output.float())
    k = min(topk, probs.shape[1])
    top = probs.topk(k, dim=1)
    classes = list(task.classes)
    out = []
    for p_row, i_row in zip(top.values.tolist(), top.indices.tolist()):
        names = [classes[i] if i < len(classes) else str(i) for i in i_row]
        cols: Dict[str, Any] = {}
        for r, (name, p) in enumerate(zip(names, p_row), start=1):
            cols[f"{t}_top{r}"], cols[f"{t}_p{r}"] = name, round(p, 6)
        text = ", ".join(f"{name} ({p:.2f})" for name, p in zip(names, p_row))
        out.append(({t: text}, cols, f"{names[0]} {p_row[0]:.2f}"))
    return out


@torch.no_grad()
def predict_images(
    loaded: Loaded, files: Sequence[Path], topk: int, out_dir: Path, device: torch.device
) -> Tuple[List[_Row], Optional[Tensor], List[str]]:
    """Rows of predictions, the first ``GRID_IMAGES`` un-normalised inputs, and the skipped images' messages."""

    cfg, model = loaded.cfg, loaded.model
    mean = torch.tensor(cfg.data.mean)[:, None, None]
    std = torch.tensor(cfg.data.std)[:, None, None]
    image_tasks = [t for t, task in loaded.tasks.items() if not task.dense]
    title_task = next(
        (t for t in image_tasks if loaded.tasks[t].has_probabilities), image_tasks[0] if image_tasks else None
    )
    rows: List[_Row] = []
    grid: List[Tensor] = []
    skipped: List[str] = []
    used: set = set()
    bar = tqdm(
        total=len(files), unit="img", desc="predict", leave=False, disable=True if len(files) <= BATCH else None
    )  # None: only on a terminal
    for start in range(0, len(files), BATCH):
        paths, x = _load_batch(files[start : start + BATCH], loaded, skipped)
        bar.update(len(files[start : start + BATCH]))
        if x is None:
            continue
        outputs = {t: o.float().cpu() for t, o in model(x.to(device)).items()}
        inputs = (x * std + mean).clamp(0, 1)
        batch_rows = [_Row(p, csv={"path": str(p)}, title=p.name) for p in paths]
        for t, task in loaded.tasks.items():
            if task.dense:
                for i, row in enumerate(batch_rows):
                    name = _overlay_name(row.path, t, used)
                    overlay = to_pil_image(task.draw(outputs[t][i], inputs[i]))
                    atomic_write(out_dir / name, functools.partial(overlay.save, format="PNG"), OUT_HINT)
                    row.cells[t], row.csv[f"{t}_overlay"] = name, str(out_dir / name)
                continue
            for row, (cells, cols, title) in zip(batch_rows, _describe(task, outputs[t], topk)):
                row.cells.update(cells)
                row.csv.update(cols)
                if t == title_task:
                    row.title = title
        rows += batch_rows
        grid += list(inputs[: max(GRID_IMAGES - len(grid), 0)])
    bar.close()
    return rows, torch.stack(grid) if grid else None, skipped


def predict_command(run: str, inputs: Sequence[str], topk: int = 3, out: Optional[str] = None) -> str:
    """``mtl predict``: write predictions.csv, predictions.png (and overlays); return a table of the predictions."""

    if topk < 1:
        raise UserError(f"--topk must be at least 1, got {topk}")
    loaded = open_run(run)
    files = find_images(inputs)
    out_dir = Path(out) if out else Path(loaded.run_dir) / "predictions"
    with writing(out_dir, OUT_HINT):
        out_dir.mkdir(parents=True, exist_ok=True)
    device = select_device("auto")
    loaded.model.to(device)
    rows, grid, skipped = predict_images(loaded, files, topk, out_dir, device)
    if skipped:
        shown = "; ".join(skipped[:3]) + ("; ..." if len(skipped) > 3 else "")
        if not rows:
            raise UserError(f"none of the {len(files)} images could be read: {shown}")
        warnings.warn(f"skipped {len(skipped)} of {len(files)} images that cannot be read: {shown}", stacklevel=2)

    columns = list(dict.fromkeys(c for row in rows for c in row.csv))

    def write_csv(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(row.csv for row in rows)

    atomic_write(out_dir / "predictions.csv", write_csv, OUT_HINT)
    if grid is not None:
        image = titled_grid(grid, [row.title for row in rows[: len(grid)]])
        atomic_write(out_dir / "predictions.png", lambda tmp: to_pil_image(image).save(tmp, format="PNG"), OUT_HINT)

    tasks = list(loaded.tasks)
    table = text_table([["file", *tasks]] + [[str(row.path), *(row.cells.get(t, "") for t in tasks)] for row in rows])
    n_dense = sum(1 for task in loaded.tasks.values() if task.dense) * len(rows)
    footer = (
        f"{len(rows)} images; wrote predictions.csv, predictions.png"
        + (f" and {n_dense} overlays" if n_dense else "")
        + f" to {out_dir}"
    )
    return f"{table}\n\n{footer}"
