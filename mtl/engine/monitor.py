"""What picks the best epoch: delta-m against single-task baselines, baseline files, the default score.

Two conventions of delta-m are in the literature; both are signed so that + means better than the baselines.
With M the run's value and B the baseline's for metric k of task t, l_k = 1 when lower is better (errors, losses)
and the relative term r_{t,k} = (-1)^{l_k} (M_{t,k} - B_{t,k}) / B_{t,k}:

- ``flat`` (Maninis et al., "Attentive Single-Tasking of Multiple Tasks", CVPR 2019; Vandenhende et al., "Multi-Task
  Learning for Dense Prediction Tasks: A Survey", TPAMI 2021; used by Nash-MTL, Navon et al. 2022, and FAMO, Liu et
  al. 2023): the mean over all K (task, metric) pairs, ``delta_m = 100 / K * sum_{t,k} r_{t,k}``. This is what
  ``train.monitor: delta_m`` and the logged ``delta_m/{train,val}`` use.
- ``libmtl`` (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023, its Delta_p): the mean over
  the T tasks of each task's mean over its K_t metrics, ``delta_p = 100 / T * sum_t (1 / K_t) sum_k r_{t,k}``.

They agree when every task has one metric; a task with more metrics weighs more in ``flat``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Mapping

import yaml

from mtl.config.load import load_yaml, yaml_problem
from mtl.core.errors import UserError

Metrics = Mapping[str, Mapping[str, float]]  # {task: {metric: value}}


def relative_terms(
    metrics: Metrics, baseline: Metrics, directions: Mapping[str, Mapping[str, bool]]
) -> Dict[str, List[float]]:
    """Per baseline task, the signed relative changes ``(-1)^{l_k} (M_k - B_k) / B_k`` of its metrics (+ = better)."""
    return {
        task: [(1.0 if directions[task][m] else -1.0) * (metrics[task][m] - base) / base for m, base in values.items()]
        for task, values in baseline.items()
    }


def delta_m(metrics: Metrics, baseline: Metrics, directions: Mapping[str, Mapping[str, bool]]) -> float:
    """Delta-m in % by the ``flat`` convention (Maninis et al. 2019; see the module docstring): the mean of the
    signed relative changes over all (task, metric) pairs of ``baseline``; ``directions``: higher is better?"""
    terms = [r for rs in relative_terms(metrics, baseline, directions).values() for r in rs]
    return 100.0 * sum(terms) / len(terms)


def delta_p(metrics: Metrics, baseline: Metrics, directions: Mapping[str, Mapping[str, bool]]) -> float:
    """Delta-m in % by the ``libmtl`` convention (LibMTL's Delta_p, Lin & Zhang 2023; see the module docstring): the
    mean over the baseline's tasks of each task's mean signed relative change."""
    per_task = [sum(rs) / len(rs) for rs in relative_terms(metrics, baseline, directions).values()]
    return 100.0 * sum(per_task) / len(per_task)


# the delta-m conventions by name (``mtl compare`` reports both)
DELTA_CONVENTIONS = {"flat": delta_m, "libmtl": delta_p}


def load_baseline(
    path: str | Path, directions: Mapping[str, Mapping[str, bool]] | None = None
) -> Dict[str, Dict[str, float]]:
    """A YAML/JSON file ``{task: {metric: value}}``, checked against the tasks' metrics when given."""
    path = Path(path)
    if path.is_dir():
        raise UserError(
            f"baseline file {path} is a directory, not a file; give the YAML file written by "
            f"`mtl compare RUN ... --write-baseline FILE`"
        )
    if not path.is_file():
        raise UserError(
            f"baseline file {path} does not exist; write one with `mtl compare RUN ... --write-baseline {path}`"
        )
    try:
        data = load_yaml(path.read_text())  # as configs: 1e-3 is a number, a metric given twice is an error
    except yaml.YAMLError as e:
        raise UserError(f"baseline file {path} is not valid YAML ({yaml_problem(e)})") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"baseline file {path} must map tasks to {{metric: value}}, e.g. `seg: {{miou: 0.52}}`")
    out: Dict[str, Dict[str, float]] = {}
    for task, values in data.items():
        if not isinstance(values, dict) or not values:
            raise UserError(f"baseline file {path}: {task} must map metrics to numbers, e.g. `{task}: {{acc: 0.9}}`")
        for metric, value in values.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0:
                raise UserError(f"baseline file {path}: {task}.{metric} must be a non-zero number, got {value!r}")
            if directions is not None:
                if task not in directions:
                    raise UserError(
                        f"baseline file {path} names task {task!r}, which the run lacks; tasks: {', '.join(directions)}"
                    )
                if metric not in directions[task]:
                    raise UserError(
                        f"baseline file {path}: task {task} has no metric {metric!r}; "
                        f"known: {', '.join(directions[task])}"
                    )
        out[str(task)] = {str(m): float(v) for m, v in values.items()}
    return out


def default_monitor(phase_metrics: Mapping[str, Any]) -> float:
    """Mean accuracy when every task has one, else the negated loss."""
    if "acc" in phase_metrics:
        return phase_metrics["acc"]
    return -phase_metrics["loss"]
