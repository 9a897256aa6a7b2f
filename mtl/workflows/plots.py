"""PNG plots of experiments, from plain data: per-method bars over seeds, two-task Pareto fronts, validation curves
as mean ± std bands over seeds, and continual-learning accuracy matrices as heatmaps.

Each ``*_chart`` function draws with its ``*_figure`` counterpart (which returns the matplotlib ``Figure``, for
tests and for callers that want to change it) and writes the PNG atomically. matplotlib is optional
(``pip install 'mtl[plots]'``) and imported only when a plot is drawn; figures are drawn without pyplot, so no
window and no global state. Colours are fixed by the order of the groups. Spread is the sample standard deviation
(ddof = 1), drawn only where there are at least two values. Non-finite values are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from mtl.core.checkpoint import atomic_write
from mtl.core.errors import UserError
from mtl.core.stats import describe

# matplotlib's tab10, written out so that the colours do not depend on the user's matplotlib style
COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
DPI = 120


def color(i: int) -> str:
    """The colour of the ``i``-th group."""
    return COLORS[i % len(COLORS)]


def line_style(i: int) -> str:
    """The line style of the ``i``-th group: solid for the first ten, then dashed and dotted, so that with the
    repeating colours every group's line is still its own."""
    return ("-", "--", ":")[i // len(COLORS) % 3]


def marker(i: int) -> str:
    """The marker of the ``i``-th group: circles for the first ten, then squares and triangles (as ``line_style``)."""
    return ("o", "s", "^")[i // len(COLORS) % 3]


MISSING = "plots need matplotlib: pip install 'mtl[plots]'"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _new_figure(width: float, height: float) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot); a missing matplotlib is one UserError line."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(MISSING) from None
    return Figure(figsize=(width, height))


def _finish(fig: Any, caption: str = "", titled: bool = False) -> Any:
    """Lay the panels out (below the figure's title when ``titled``: tight_layout does not see it), then put
    ``caption`` under them (``_save`` crops the PNG to everything drawn)."""
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / fig.get_figheight()) if titled else None)
    if caption:
        fig.text(0.01, 0.0, caption, ha="left", va="top", fontsize=8)
    return fig


def _finite(value: Any, what: str) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise UserError(f"{what} is {x} (a diverged run?); leave that run out of the plot")
    return x


def mean_std(values: Sequence[float]) -> Tuple[float, Optional[float]]:
    """Mean and sample standard deviation (ddof = 1) of ``values``; the std is None for a single value."""
    if not values:
        raise UserError("no values to average")
    stat = describe(values)
    return stat.mean, stat.std


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"plots are written as PNG: {path} must end in .png")
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight"))
    return path


def _tick_labels(ax: Any, positions: Sequence[float], labels: Sequence[str]) -> None:
    """Ticks at ``positions``; labels rotated when long, so that they do not overlap."""
    ax.set_xticks(list(positions))
    long = sum(len(label) for label in labels) > 12 * max(len(labels), 1) or any(len(label) > 24 for label in labels)
    ax.set_xticklabels(labels, rotation=30 if long else 0, ha="right" if long else "center")


# --------------------------------------------------------------------------- bars


def bar_figure(groups: Mapping[str, Mapping[str, Sequence[float]]], title: str = "") -> Any:
    """One panel per metric, one bar per group at the mean of its seeds, the sample std as error bar, the seeds
    as dots; ``groups`` = {group label: {metric name: per-seed values}}."""
    if not groups:
        raise UserError("bar chart: no groups to draw")
    metrics = list(dict.fromkeys(m for values in groups.values() for m in values))
    if not metrics:
        raise UserError("bar chart: the groups hold no metric")
    labels = list(groups)
    cols = min(len(metrics), 3 if len(labels) <= 6 else 2 if len(labels) <= 10 else 1)
    rows = math.ceil(len(metrics) / cols)
    width = max(3.2, 0.7 * len(labels) + 1.2)
    fig = _new_figure(width * cols, 3.4 * rows)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        positions, ticks = [], []
        for i, label in enumerate(labels):
            values = [_finite(v, f"bar chart: {label} {metric}") for v in groups[label].get(metric, ())]
            if not values:
                continue
            mean, std = mean_std(values)
            ax.bar(i, mean, width=0.7, color=color(i), alpha=0.75, label=label)
            if std is not None:
                ax.errorbar(i, mean, yerr=std, fmt="none", ecolor="black", capsize=4)
            offsets = [0.0] if len(values) == 1 else [-0.2 + 0.4 * j / (len(values) - 1) for j in range(len(values))]
            ax.scatter([i + o for o in offsets], values, s=14, color="black", zorder=3)
            positions.append(i)
            ticks.append(f"{label} (n={len(values)})")
        _tick_labels(ax, positions, ticks)
        ax.set_title(metric)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title)
    return _finish(
        fig, "bars: mean over seeds; error bars: sample std (ddof=1, none for n=1); dots: one run each", bool(title)
    )


def bar_chart(groups: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str = "") -> Path:
    """Write ``bar_figure(groups, title)`` to the PNG ``path``; returns the path."""
    return _save(bar_figure(groups, title), path)


# --------------------------------------------------------------------------- Pareto


def pareto_front(points: Sequence[Tuple[float, float]], maximize: Tuple[bool, bool] = (True, True)) -> List[int]:
    """Indices (ascending) of the points no other point dominates: as good in both coordinates and better in one
    (Pareto, 1896). Equal points do not dominate each other, so all copies of a front point are on it."""
    signs = [1.0 if m else -1.0 for m in maximize]
    pts = [(signs[0] * _finite(x, "pareto: x"), signs[1] * _finite(y, "pareto: y")) for x, y in points]
    order = sorted(range(len(pts)), key=lambda i: -pts[i][0])
    front: List[int] = []
    best = -math.inf  # the highest y among the points of strictly greater x
    k = 0
    while k < len(order):  # one x value at a time, highest first
        same = [order[k]]
        while k + len(same) < len(order) and pts[order[k + len(same)]][0] == pts[order[k]][0]:
            same.append(order[k + len(same)])
        top = max(pts[i][1] for i in same)
        if top > best:
            front += [i for i in same if pts[i][1] == top]
        best = max(best, top)
        k += len(same)
    return sorted(front)


def _direction(name: str, maximize: bool) -> str:
    return f"{name} ({'higher' if maximize else 'lower'} is better)"


def pareto_figure(
    runs: Sequence[Tuple[str, float, float]],
    x_name: str,
    y_name: str,
    maximize: Tuple[bool, bool] = (True, True),
    title: str = "",
) -> Any:
    """One point per run ``(group, x, y)`` coloured by group; each group's mean as a big marker with ± sample std
    whiskers; the Pareto front of the group means as a step line."""
    if not runs:
        raise UserError("Pareto chart: no runs to draw")
    by_group: Dict[str, List[Tuple[float, float]]] = {}
    for group, x, y in runs:
        point = (_finite(x, f"Pareto chart: {group} {x_name}"), _finite(y, f"Pareto chart: {group} {y_name}"))
        by_group.setdefault(group, []).append(point)
    fig = _new_figure(6.4, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    means = []
    for i, (group, points) in enumerate(by_group.items()):
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        ax.scatter(xs, ys, s=16, color=color(i), marker=marker(i), alpha=0.6)
        (mx, sx), (my, sy) = mean_std(xs), mean_std(ys)
        ax.errorbar(
            mx,
            my,
            xerr=sx,
            yerr=sy,
            fmt=marker(i),
            markersize=9,
            color=color(i),
            capsize=3,
            label=f"{group} (n={len(xs)})",
        )
        means.append((mx, my))
    line = front_line([means[i] for i in pareto_front(means, maximize)], maximize)
    ax.plot([p[0] for p in line], [p[1] for p in line], color="black", linewidth=1, linestyle="--", label="front")
    ax.set_xlabel(_direction(x_name, maximize[0]))
    ax.set_ylabel(_direction(y_name, maximize[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _finish(fig, "dots: one run each; big markers: group means ± sample std; dashed: Pareto front of the means")


def front_line(front: Sequence[Tuple[float, float]], maximize: Tuple[bool, bool] = (True, True)) -> List[Tuple]:
    """The staircase through the points of a Pareto front: the border of the region they dominate."""
    signs = [1.0 if m else -1.0 for m in maximize]
    pts = sorted({(signs[0] * x, signs[1] * y) for x, y in front})  # x up, so y down along a front
    line: List[Tuple[float, float]] = []
    for k, (x, y) in enumerate(pts):
        if k:
            line.append((pts[k - 1][0], y))
        line.append((x, y))
    return [(signs[0] * x, signs[1] * y) for x, y in line]


def pareto_chart(
    runs: Sequence[Tuple[str, float, float]],
    x_name: str,
    y_name: str,
    path: str | Path,
    maximize: Tuple[bool, bool] = (True, True),
    title: str = "",
) -> Path:
    """Write ``pareto_figure(...)`` to the PNG ``path``; returns the path."""
    return _save(pareto_figure(runs, x_name, y_name, maximize, title), path)


# --------------------------------------------------------------------------- curves


def curve_band(seed_curves: Sequence[Sequence[Tuple[int, float]]]) -> List[Tuple[int, float, Optional[float], int]]:
    """``(epoch, mean, sample std or None, n)`` per epoch over the seeds' curves of ``(epoch, value)``: each epoch
    averages the seeds that reached it."""
    by_epoch: Dict[int, List[float]] = {}
    for s, curve in enumerate(seed_curves):
        seen = set()
        for epoch, value in curve:
            if epoch in seen:
                raise UserError(f"curve chart: seed curve {s} gives epoch {epoch} twice")
            seen.add(epoch)
            by_epoch.setdefault(int(epoch), []).append(_finite(value, f"curve chart: epoch {epoch}"))
    return [(e, *mean_std(by_epoch[e]), len(by_epoch[e])) for e in sorted(by_epoch)]


def curve_figure(curves: Mapping[str, Sequence[Sequence[Tuple[int, float]]]], y_name: str, title: str = "") -> Any:
    """Per group the mean over seeds per epoch as a line and ± the sample std as a band; ``curves`` = {group:
    [per seed: [(epoch, value)]]}. Epochs that only some seeds reach average those, and the caption says so."""
    if not curves or not any(any(c) for c in curves.values()):
        raise UserError("curve chart: no curves to draw")
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    partial = []
    for i, (group, seed_curves) in enumerate(curves.items()):
        band = curve_band(seed_curves)
        if not band:
            continue
        epochs = [b[0] for b in band]
        means = [b[1] for b in band]
        stds = [b[2] or 0.0 for b in band]
        ax.plot(epochs, means, color=color(i), ls=line_style(i), marker="." if len(band) < 30 else None, label=group)
        ax.fill_between(
            epochs,
            [m - s for m, s in zip(means, stds)],
            [m + s for m, s in zip(means, stds)],
            color=color(i),
            alpha=0.2,
        )
        for n in sorted({b[3] for b in band if b[3] < len(seed_curves)}):
            fewer = [b[0] for b in band if b[3] == n]
            partial.append(
                f"{group}: epoch{'s' * (len(fewer) > 1)} {_ranges(fewer)} from {n} of {len(seed_curves)} seeds"
            )
    ax.xaxis.get_major_locator().set_params(integer=True)  # whole epochs
    ax.set_xlabel("epoch")
    ax.set_ylabel(y_name)
    ax.grid(alpha=0.3)
    named = bool(ax.get_legend_handles_labels()[1])  # one unnamed group (a sweep of seeds only): no legend
    if named and len(curves) > 6:  # beside the lines rather than over them
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    elif named:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    text = "lines: mean over seeds; bands: ± sample std (ddof=1, none where one seed)"
    return _finish(fig, "; ".join([text] + partial))


def _ranges(epochs: Sequence[int]) -> str:
    """``1-3, 5`` for [1, 2, 3, 5]."""
    spans: List[List[int]] = []
    for e in epochs:
        if spans and e == spans[-1][1] + 1:
            spans[-1][1] = e
        else:
            spans.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def curve_chart(
    curves: Mapping[str, Sequence[Sequence[Tuple[int, float]]]], path: str | Path, y_name: str, title: str = ""
) -> Path:
    """Write ``curve_figure(curves, y_name, title)`` to the PNG ``path``; returns the path."""
    return _save(curve_figure(curves, y_name, title), path)


# --------------------------------------------------------------------------- heatmap


def heatmap_figure(
    matrix: Sequence[Sequence[Optional[float]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    title: str = "",
) -> Any:
    """The continual accuracy matrix: ``matrix[i][j]`` = accuracy on task j after training task i, each cell
    annotated, None left blank. Values within [0, 1] share the colour scale 0..1, so methods compare."""
    if len(matrix) != len(row_labels) or any(len(row) != len(col_labels) for row in matrix):
        raise UserError(
            f"heatmap: the matrix must have {len(row_labels)} rows of {len(col_labels)} values (one per label), "
            f"got rows of {[len(row) for row in matrix]}"
        )
    cells = [
        [None if v is None else _finite(v, f"heatmap: R[{i}][{j}]") for j, v in enumerate(row)]
        for i, row in enumerate(matrix)
    ]
    values = [v for row in cells for v in row if v is not None]
    if not values:
        raise UserError("heatmap: every value is None")
    low, high = (0.0, 1.0) if 0 <= min(values) and max(values) <= 1 else (min(values), max(values))
    data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in cells], dtype=float))
    n_rows, n_cols = len(row_labels), len(col_labels)
    fig = _new_figure(max(3.5, 0.9 * n_cols + 2), max(3.0, 0.6 * n_rows + 1.5))
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(data, cmap="viridis", vmin=low, vmax=high if high > low else low + 1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    for i in range(n_rows):
        for j in range(n_cols):
            if cells[i][j] is not None:
                shade = (cells[i][j] - low) / ((high - low) or 1)
                ink = "black" if shade > 0.6 else "white"
                ax.text(j, i, f"{cells[i][j]:.3f}", ha="center", va="center", fontsize=8, color=ink)
    _tick_labels(ax, range(n_cols), list(col_labels))
    ax.set_yticks(list(range(n_rows)))
    ax.set_yticklabels(list(row_labels))
    ax.set_xlabel("accuracy on task")
    ax.set_ylabel("after training task")
    if title:
        ax.set_title(title)
    return _finish(fig)


def heatmap_chart(
    matrix: Sequence[Sequence[Optional[float]]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Write ``heatmap_figure(...)`` to the PNG ``path``; returns the path."""
    return _save(heatmap_figure(matrix, row_labels, col_labels, title), path)


# --------------------------------------------------------------------------- learning-rate range test


def lr_find_figure(
    lrs: Sequence[float], losses: Sequence[float], smoothed: Sequence[float], suggestion: Optional[float]
) -> Any:
    """``mtl lr-find``'s curve: the loss per step (faint) and its smoothed value against the lr (log axis), the
    suggested lr as a dashed line. Non-finite points (a diverged last step) are left out."""
    fig = _new_figure(6.4, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    finite = [i for i in range(len(lrs)) if math.isfinite(losses[i]) and math.isfinite(smoothed[i])]
    if not finite:
        raise UserError("lr-find plot: no finite loss to draw")
    x = [lrs[i] for i in finite]
    ax.plot(x, [losses[i] for i in finite], color=color(0), alpha=0.3, linewidth=1, label="loss")
    ax.plot(x, [smoothed[i] for i in finite], color=color(0), linewidth=2, label="smoothed loss")
    if suggestion is not None:
        ax.axvline(suggestion, color=color(3), linestyle="--", label=f"suggested lr {suggestion:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (optim.lr)")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    ax.set_title("learning-rate range test", fontsize=10)
    return _finish(fig)


def lr_find_chart(
    lrs: Sequence[float],
    losses: Sequence[float],
    smoothed: Sequence[float],
    suggestion: Optional[float],
    path: str | Path,
) -> Path:
    """Write ``lr_find_figure(...)`` to the PNG ``path``; returns the path."""
    return _save(lr_find_figure(lrs, losses, smoothed, suggestion), path)
