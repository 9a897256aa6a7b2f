"""``mtl compare`` of continual runs (``continual.methods``): every method's metrics as mean ± std over the runs that
differ only in ``train.seed``, the mean accuracy matrix of each method, and ACC against the parameters added.

A continual run's root holds ``summary.json`` with ``methods``; its metrics are read on the test split when every
run of a group has one (each task's best epoch was picked on the validation split), else on the validation split.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from mtl.core.checkpoint import atomic_write
from mtl.core.errors import UserError
from mtl.core.stats import Stat, describe
from mtl.workflows.compare import _differing, _label_part, _read_config, _strip
from mtl.workflows.continual import split_view
from mtl.workflows.plots import have_matplotlib, heatmap_chart, pareto_chart

COLUMNS = (
    ("acc", "ACC", False),
    ("bwt", "BWT", True),
    ("fwt_gem", "FWT (GEM)", True),
    ("forgetting", "forgetting", False),
    ("transfer_pnn", "transfer PNN %", True),
)


@dataclass
class ContinualGroup:
    """The runs of one configuration (all seeds), their task names and the split they are read on."""

    label: str
    runs: List[Tuple[Path, Dict[str, Any]]] = field(default_factory=list)

    @property
    def split(self) -> str:
        return (
            "test" if all("test" in r.get("splits", []) for _, s in self.runs for r in s["methods"].values()) else "val"
        )

    @property
    def tasks(self) -> List[str]:
        return list(self.runs[0][1]["tasks"])

    @property
    def methods(self) -> List[str]:
        return list(dict.fromkeys(m for _, s in self.runs for m in s["methods"]))

    def views(self, method: str) -> List[Mapping[str, Any]]:
        return [split_view(s["methods"][method], self.split) for _, s in self.runs if method in s["methods"]]


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def is_continual_run(folder: Path) -> bool:
    summary = _read(folder / "summary.json") if (folder / "summary.json").is_file() else None
    return isinstance(summary, dict) and "methods" in summary


def find_continual_runs(paths: Sequence[str | Path]) -> Tuple[List[Path], List[str], List[Path]]:
    """The continual run roots under ``paths`` (searched down to the first summary.json), the folders left out
    (unfinished: a config.yaml without summary.json), and the other runs found (not continual)."""
    roots: List[Path] = []
    skipped: List[str] = []
    others: List[Path] = []

    def walk(folder: Path) -> None:
        if (folder / "summary.json").is_file():
            (roots if is_continual_run(folder) else others).append(folder)
            return
        if (folder / "config.yaml").is_file() and not (folder / "sweep.json").is_file():
            skipped.append(f"{folder} (no summary.json: unfinished?)")
            return
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            walk(child)

    for p in map(Path, paths):
        if p.is_dir():
            walk(p)
    return list(dict.fromkeys(r.resolve() for r in roots)), skipped, others


def continual_groups(roots: Sequence[Path]) -> List[ContinualGroup]:
    """The runs grouped by their config without ``train.seed``, ``name`` and ``out_dir``; labelled by the keys in
    which the groups differ."""
    configs: Dict[str, Dict[str, Any]] = {}
    names: Dict[str, str] = {}
    groups: Dict[str, ContinualGroup] = {}
    for root in roots:
        summary = _read(root / "summary.json")
        config = _read_config(root)
        key = json.dumps(_strip(config), sort_keys=True) if config is not None else str(root)
        configs.setdefault(key, _strip(config or {}))
        names.setdefault(key, str((config or {}).get("name") or root))
        groups.setdefault(key, ContinualGroup(label="")).runs.append((root, summary))
    differing = _differing(list(configs.values())) if len(configs) > 1 else []
    for key, group in groups.items():
        parts = [_label_part(configs[key], d) for d in differing]
        group.label = " ".join(p for p in parts if p) or names[key]
    for group in groups.values():
        tasks = {tuple(s["tasks"]) for _, s in group.runs}
        if len(tasks) > 1:
            raise UserError(f"the runs of {group.label!r} have different task sequences: {sorted(tasks)}")
    return list(groups.values())


def _cell(stat: Optional[Stat], signed: bool, digits: int = 4) -> str:
    if stat is None:
        return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f.format(stat.mean) + (f" ± {stat.std:.{digits}f}" if stat.std is not None else "")


def _stat(values: Sequence[Optional[float]]) -> Optional[Stat]:
    values = [float(v) for v in values if v is not None]
    return describe(values) if values else None


def continual_table(groups: Sequence[ContinualGroup]) -> str:
    """Markdown: per group and method, n runs and the metrics as mean ± sample std; parameters added per task
    (mean over tasks), total training seconds and the largest peak memory of a task."""
    lines = []
    for group in groups:
        names = " → ".join(group.tasks)
        lines.append(
            f"{group.label}: {len(group.runs)} run(s), tasks {names}; metrics on the {group.split} split"
            + (" (each task's best epoch picked on validation)" if group.split == "test" else "")
        )
        lines.append("")
        header = ["method", "n"] + [title for _, title, _ in COLUMNS]
        header += ["params added per task", "train s (all tasks)", "peak MiB"]
        lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
        for method in group.methods:
            views = group.views(method)
            cells = [method, str(len(views))]
            for key, _, signed in COLUMNS:
                digits = 2 if key == "transfer_pnn" else 4
                cells.append(_cell(_stat([v.get(key) for v in views]), signed, digits))
            cells.append(_cell(_stat([sum(v["params_per_task"]) / len(v["params_per_task"]) for v in views]), False, 0))
            cells.append(_cell(_stat([sum(v.get("time_s") or [0.0]) for v in views]), False, 0))
            peaks = [max((m or {}).get("peak_mib", 0.0) for m in v.get("memory") or [None]) for v in views]
            cells.append(_cell(_stat(peaks), False, 0))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip()


def mean_matrix(views: Sequence[Mapping[str, Any]]) -> List[List[Optional[float]]]:
    """The element-wise mean of the runs' accuracy matrices R (lower triangle), None above the diagonal."""
    T = len(views[0]["R"])
    return [[sum(v["R"][i][j] for v in views) / len(views) if j <= i else None for j in range(T)] for i in range(T)]


def continual_plots(groups: Sequence[ContinualGroup], out: str | Path) -> List[Path]:
    """Per group and method the mean accuracy matrix as a heatmap, and per group ACC against the parameters added
    per task (one dot per run, the mean ± std per method). Needs matplotlib (``pip install 'mtl[plots]'``)."""
    if not have_matplotlib():
        raise UserError("mtl compare --plots needs matplotlib: pip install 'mtl[plots]'")
    out = Path(out)
    paths = []
    for gi, group in enumerate(groups):
        prefix = f"{gi}_" if len(groups) > 1 else ""
        rows = [f"after {t}" for t in group.tasks]
        points = []
        for method in group.methods:
            views = group.views(method)
            title = f"{method}: mean {group.split} accuracy over {len(views)} run(s)"
            path = out / f"{prefix}accuracy_{method}.png"
            paths.append(heatmap_chart(mean_matrix(views), rows, group.tasks, path, title))
            points += [(method, sum(v["params_per_task"]) / len(v["params_per_task"]), v["acc"]) for v in views]
        paths.append(
            pareto_chart(
                points,
                "parameters added per task",
                f"ACC ({group.split})",
                out / f"{prefix}acc_vs_params.png",
                maximize=(False, True),
                title=group.label,
            )
        )
    return paths


def write_continual_report(roots: Sequence[Path], out: str | Path) -> Path:
    """``results.md`` in ``out`` for continual runs: the table ``mtl compare`` prints and, with matplotlib
    installed, its pictures under ``out/plots``."""
    out = Path(out)
    groups = continual_groups(roots)
    pictures = continual_plots(groups, out / "plots") if have_matplotlib() else []
    text = continual_table(groups) + "\n\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in pictures)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    return out / "results.md"
