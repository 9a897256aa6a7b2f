"""The ``mtl compare`` table of runs (delta-m and baseline files: ``mtl.engine.monitor``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from mtl.core.errors import UserError
from mtl.engine.monitor import Metrics, delta_m, load_baseline

# --------------------------------------------------------------------------- runs


def find_runs(paths: Sequence[str]) -> List[Tuple[str, Dict[str, Any]]]:
    """``(label, summary)`` per run: a run directory, a staged run (one row per stage), or a folder of runs."""
    rows: List[Tuple[str, Dict[str, Any]]] = []
    for p in map(Path, paths):
        summaries = [p / "summary.json"] if (p / "summary.json").is_file() else sorted(p.glob("*/summary.json"))
        if not summaries:
            raise UserError(f"{p} holds no run (no summary.json in it or its subfolders); is the run finished?")
        for s in summaries:
            try:
                summary = json.loads(s.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise UserError(f"cannot read {s}: {e}") from None
            label = str(s.parent)
            if "stages" in summary:
                rows += [(f"{label}/{st['name']}", st) for st in summary["stages"]]
            else:
                rows.append((label, summary))
    return rows


def run_metrics(summary: Mapping[str, Any], which: str = "final") -> Dict[str, Dict[str, float]]:
    """Per-task validation metrics of a run's ``final`` or ``best`` epoch."""
    phase = (summary.get(which) or {}).get("val") or {}
    return {t: dict(m) for t, m in (phase.get("tasks") or {}).items()}


def run_directions(summary: Mapping[str, Any]) -> Dict[str, Dict[str, bool]]:
    return {t: dict(info.get("directions", {})) for t, info in (summary.get("tasks") or {}).items()}


def compare_table(
    paths: Sequence[str], baseline: Optional[str] = None, which: str = "final", metrics: Optional[Sequence[str]] = None
) -> str:
    """A Markdown table: one row per run, one column per task metric, and delta_m with a baseline."""
    rows = find_runs(paths)
    columns: List[Tuple[str, str]] = []
    reported: Dict[str, None] = {}  # every metric name of the runs, in order
    for _, summary in rows:
        for task, values in run_metrics(summary, which).items():
            for metric in values:
                reported[metric] = None
                if ((metric in metrics) if metrics else metric != "loss") and (task, metric) not in columns:
                    columns.append((task, metric))
    unknown = [m for m in metrics or [] if m not in reported]
    if unknown:
        raise UserError(
            f"--metrics: no run reports {', '.join(unknown)}; the runs report {', '.join(reported) or 'none'}"
        )
    base = load_baseline(baseline) if baseline else None
    header = ["run", "weighting"] + [f"{t}.{m}" for t, m in columns] + (["Δm %"] if base else [])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    for label, summary in rows:
        values = run_metrics(summary, which)
        cells = [label, str(summary.get("weighting", ""))]
        cells += [f"{values[t][m]:.4f}" if m in values.get(t, {}) else "" for t, m in columns]
        if base:
            cells.append(_delta_cell(values, base, run_directions(summary)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta_cell(values: Metrics, base: Metrics, directions: Mapping[str, Mapping[str, bool]]) -> str:
    if any(t not in values or any(m not in values[t] for m in ms) for t, ms in base.items()):
        return "n/a"  # the run lacks some baseline task or metric (e.g. a single-task run)
    return f"{delta_m(values, base, directions):+.2f}"


def write_baseline(paths: Sequence[str], out: str | Path, which: str = "final") -> Dict[str, Dict[str, float]]:
    """Merge the per-task metrics of (single-task) runs into a baseline file; a task in two runs is an error."""
    baseline: Dict[str, Dict[str, float]] = {}
    source: Dict[str, str] = {}
    for label, summary in find_runs(paths):
        for task, values in run_metrics(summary, which).items():
            if task in baseline:
                raise UserError(f"task {task!r} is in both {source[task]} and {label}; give one run per task")
            # a zero baseline cannot be improved on relatively (e.g. no pixel within 11.25 degrees yet): left out
            baseline[task] = {m: v for m, v in values.items() if m != "loss" and v != 0}
            source[task] = label
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        "# single-task baselines for delta_m: {task: {metric: value}}\n" + yaml.safe_dump(baseline, sort_keys=False)
    )
    return baseline
