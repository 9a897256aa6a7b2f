"""Pictures of an aggregate (``mtl compare --plots``, the end of ``mtl sweep``): per-group bars with error bars,
the two-task Pareto front and validation curves as mean ± std bands, drawn by ``mtl.workflows.plots``."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from mtl.core.checkpoint import atomic_write
from mtl.core.errors import UserError
from mtl.workflows.compare import HEADERS, Aggregate, Group, render, run_curve, shown_columns, split_column
from mtl.workflows.plots import bar_chart, curve_chart, have_matplotlib, pareto_chart


def _file_part(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", text).strip("_") or "all"


def _tasks(groups: Sequence[Group]) -> Dict[str, Tuple[str, Dict[str, bool]]]:
    """Each task of the runs with its primary metric and metric directions (higher is better), from summary.json."""
    tasks: Dict[str, Tuple[str, Dict[str, bool]]] = {}
    for g in groups:
        for run in g.runs:
            for task, info in (run.summary.get("tasks") or {}).items():
                if task not in tasks and info.get("primary"):
                    tasks[task] = (info["primary"], dict(info.get("directions", {})))
    return tasks


def _finite_values(runs: Sequence, column: str) -> List[float]:
    return [r.values[column] for r in runs if column in r.values and math.isfinite(r.values[column])]


def write_plots(agg: Aggregate, out: str | Path, metrics: Optional[Sequence[str]] = None) -> List[Path]:
    """The PNGs of ``agg`` under ``out``: ``bars.png`` (the columns ``mtl compare`` shows: every metric
    except losses unless ``metrics`` names them, delta-m and step time);
    ``pareto.png`` when the runs have exactly two tasks (their primary metrics, one point per run);
    ``curves_<task>.png`` (each task's primary validation metric per epoch, mean ± std over seeds). The stages of
    staged runs are groups like any other, so the strategies of one staged config share one chart. Runs whose
    value is not finite (a diverged run) are left out of the pictures; the tables still show them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = shown_columns(agg, metrics)
    written: List[Path] = []
    groups = agg.groups
    short, axis = short_labels([g.label for g in groups])
    split = "test" if agg.reported == "test" else "validation"
    bars = {short[g.label]: {HEADERS.get(c, c): v for c in columns if (v := _finite_values(g.runs, c))} for g in groups}
    bars = {label: values for label, values in bars.items() if values}
    if bars:
        written.append(bar_chart(bars, out / "bars.png", f"{split} metrics{axis}, mean ± std over seeds"))
    order = [split_column(c)[0] for c in agg.columns if c not in HEADERS]
    tasks = dict(sorted(_tasks(groups).items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    if len(tasks) == 2:
        (ta, (ma, da)), (tb, (mb, db)) = tasks.items()
        xa, yb = f"{ta}.{ma}", f"{tb}.{mb}"
        points = [
            (short[g.label], r.values[xa], r.values[yb])
            for g in groups
            for r in g.runs
            if xa in r.values and yb in r.values and math.isfinite(r.values[xa]) and math.isfinite(r.values[yb])
        ]
        if points:
            maximize = (da.get(ma, True), db.get(mb, True))
            written.append(
                pareto_chart(points, xa, yb, out / "pareto.png", maximize, f"{split}{axis}: one point per run")
            )
    for task, (metric, _) in tasks.items():
        curves = {short[label]: seeds for label, seeds in _curves(groups, task, metric).items()}
        if curves:
            title = f"validation {task}.{metric} per epoch{axis}, mean ± std over seeds"
            written.append(curve_chart(curves, out / f"curves_{_file_part(task)}.png", metric, title))
    return written


def _curves(groups: Sequence[Group], task: str, metric: str) -> Mapping[str, List[List[Tuple[int, float]]]]:
    curves: Dict[str, List[List[Tuple[int, float]]]] = {}
    for g in groups:
        seeds = []
        for run in g.runs:
            try:
                curve = [(e, v) for e, v in run_curve(run.dir, task, metric) if math.isfinite(v)]
            except UserError:  # no metrics.jsonl, or no values of this metric (e.g. a run that stopped early)
                continue
            if curve:
                seeds.append(curve)
        if seeds:
            curves[g.label] = seeds
    return curves


def short_labels(labels: Sequence[str]) -> Tuple[Dict[str, str], str]:
    """Group labels without the key they all vary alone (``weighting.name=pcgrad`` -> ``pcgrad``), and the text
    naming that key for a title (`` by weighting.name``); the labels as they are otherwise."""
    keys = {label.split("=", 1)[0] for label in labels}
    if len(keys) == 1 and all(label.count("=") == 1 and " " not in label for label in labels):
        return {label: label.split("=", 1)[1] for label in labels}, f" by {keys.pop()}"
    return {label: label for label in labels}, ""


def write_report(agg: Aggregate, out: str | Path) -> Path:
    """``results.md`` in ``out``: the aggregate's Markdown table (as ``mtl compare`` prints it) and, with matplotlib
    installed, its pictures under ``out/plots``."""
    out = Path(out)
    pictures = write_plots(agg, out / "plots") if have_matplotlib() else []
    text = render(agg, "md") + "\n\n" + "".join(f"![{p.stem}](plots/{p.name})\n" for p in pictures)
    atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    return out / "results.md"
