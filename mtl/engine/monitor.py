"""What picks the best epoch: delta-m against single-task baselines, baseline files, the default score.

Delta-m (Maninis et al. 2019; the flat mean over metrics used by nash-mtl and LibMTL)::

    delta_m = 100 / K * sum_k (-1)^{l_k} (M_k - B_k) / B_k

over the K (task, metric) pairs of the baseline file, with M the run's value, B the baseline's and
l_k = 1 when lower is better for metric k (errors, losses). Positive means better than the baselines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Mapping

import yaml

from mtl.config.load import load_yaml, yaml_problem
from mtl.core.errors import UserError

Metrics = Mapping[str, Mapping[str, float]]  # {task: {metric: value}}


def delta_m(metrics: Metrics, baseline: Metrics, directions: Mapping[str, Mapping[str, bool]]) -> float:
    """Mean relative improvement (in %) of ``metrics`` over ``baseline``; ``directions``: higher is better?"""
    terms = []
    for task, values in baseline.items():
        for metric, base in values.items():
            sign = 1.0 if directions[task][metric] else -1.0
            terms.append(sign * (metrics[task][metric] - base) / base)
    return 100.0 * sum(terms) / len(terms)


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
