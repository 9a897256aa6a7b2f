"""PNG plots (mtl.workflows.plots): the numbers drawn, read back from the figures' artists, against statistics and
numpy; the Pareto front against a brute force; the files are PNGs; bad input and a missing matplotlib refused."""

import random
import statistics
import sys

import numpy as np
import pytest
from PIL import Image

from mtl.core.checkpoint import TEMP_SUFFIX
from mtl.core.errors import UserError
from mtl.workflows import plots

pytest.importorskip("matplotlib")

pytestmark = pytest.mark.filterwarnings("error")  # no matplotlib warnings (layout, fonts, ticks)


def _is_png(path, min_dpi=100):
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 100 and image.size[1] > 100
        assert min(image.info["dpi"]) >= min_dpi - 0.5
    assert not [p for p in path.parent.iterdir() if p.name.endswith(TEMP_SUFFIX)]


def _error_bars(ax):
    """{x: (low, high)} of the vertical error bars drawn in ``ax``."""
    found = {}
    for container in ax.containers:
        if container.__class__.__name__ == "ErrorbarContainer" and container.has_yerr:
            for (x0, y0), (_, y1) in container.lines[2][-1].get_segments():
                found[round(float(x0), 9)] = (float(y0), float(y1))
    return found


def _dots(ax):
    return [c for c in ax.collections if c.__class__.__name__ == "PathCollection"]


# --------------------------------------------------------------------------- Pareto front


def _dominated_brute(points, maximize):
    """Index set of the points some other point dominates, by comparing every pair."""
    sign = [1 if m else -1 for m in maximize]
    out = set()
    for i, p in enumerate(points):
        for j, q in enumerate(points):
            ge = all(s * a >= s * b for s, a, b in zip(sign, q, p))
            gt = any(s * a > s * b for s, a, b in zip(sign, q, p))
            if i != j and ge and gt:
                out.add(i)
    return out


@pytest.mark.parametrize("maximize", [(True, True), (True, False), (False, True), (False, False)])
def test_pareto_front_matches_brute_force_on_random_points(maximize):
    rng = random.Random(0)
    for trial in range(200):
        n = rng.randint(1, 25)
        if trial % 2:  # small integers: many ties in one or both coordinates
            points = [(rng.randint(0, 4), rng.randint(0, 4)) for _ in range(n)]
        else:
            points = [(rng.gauss(0, 1), rng.gauss(0, 1)) for _ in range(n)]
        expected = sorted(set(range(n)) - _dominated_brute(points, maximize))
        assert plots.pareto_front(points, maximize) == expected, (points, maximize)


def test_pareto_front_hand_case_keeps_equal_points_and_drops_ties_dominated():
    points = [(1, 1), (2, 0), (0, 2), (1, 1), (0.5, 0.5), (2, -1), (0, 1)]
    # (2,-1) loses to (2,0) at equal x; (0,1) loses to (0,2) at equal x; both copies of (1,1) stay
    assert plots.pareto_front(points) == [0, 1, 2, 3]
    assert plots.pareto_front(points, (False, False)) == [4, 5, 6]  # (0.5, 0.5) beats neither nor loses
    assert plots.pareto_front([]) == []


def test_front_line_is_the_staircase_of_the_dominated_region():
    assert plots.front_line([(3, 1), (1, 3), (2, 2)]) == [(1, 3), (1, 2), (2, 2), (2, 1), (3, 1)]
    # minimising both: the border of the region up and right of (1, 3) and (3, 1)
    assert plots.front_line([(1, 3), (3, 1)], (False, False)) == [(3, 1), (3, 3), (1, 3)]


# --------------------------------------------------------------------------- bars


def test_bar_chart_draws_means_sample_std_and_every_seed(tmp_path):
    groups = {
        "equal": {"left.acc": [0.81, 0.84, 0.78], "right.acc": [0.70, 0.74]},
        "pcgrad weighting.grad_on=params": {"left.acc": [0.9]},
    }
    fig = plots.bar_figure(groups, title="t")
    left, right = fig.axes
    assert [ax.get_title() for ax in fig.axes] == ["left.acc", "right.acc"]
    assert [p.get_height() for p in left.patches] == pytest.approx([statistics.mean([0.81, 0.84, 0.78]), 0.9])
    assert [p.get_height() for p in right.patches] == pytest.approx([0.72])
    m, s = statistics.mean([0.81, 0.84, 0.78]), statistics.stdev([0.81, 0.84, 0.78])
    assert _error_bars(left) == {0.0: pytest.approx((m - s, m + s))}  # none for pcgrad's single seed
    seeds = sorted(float(y) for c in _dots(left) for y in c.get_offsets()[:, 1])
    assert seeds == pytest.approx(sorted([0.81, 0.84, 0.78, 0.9]))
    ticks = [t.get_text() for t in left.get_xticklabels()]
    assert ticks == ["equal (n=3)", "pcgrad weighting.grad_on=params (n=1)"]
    assert left.get_xticklabels()[0].get_rotation() == 30  # long labels are rotated
    # colours follow the group, the same in every panel and every call
    assert left.patches[0].get_facecolor() == right.patches[0].get_facecolor()
    assert plots.bar_figure(groups).axes[0].patches[1].get_facecolor() == left.patches[1].get_facecolor()
    assert any("sample std" in t.get_text() for t in fig.texts)
    out = plots.bar_chart(groups, tmp_path / "bars.png", title="t")
    assert out == tmp_path / "bars.png"
    _is_png(out)


# --------------------------------------------------------------------------- Pareto chart


def test_pareto_chart_marks_group_means_with_whiskers_and_the_front_of_the_means(tmp_path):
    runs = [("a", 0.8, 0.5), ("a", 0.9, 0.7), ("b", 0.6, 0.9), ("b", 0.7, 0.8), ("c", 0.5, 0.5)]
    fig = plots.pareto_figure(runs, "left.acc", "right.acc")
    ax = fig.axes[0]
    means = {"a": (0.85, 0.6), "b": (0.65, 0.85), "c": (0.5, 0.5)}
    drawn = [c.lines[0].get_xydata()[0] for c in ax.containers]
    assert np.allclose(drawn, list(means.values()))
    a_x, a_y = [0.8, 0.9], [0.5, 0.7]
    bars = ax.containers[0].lines[2]  # x whiskers, then y whiskers
    (x_low, _), (x_high, _) = bars[0].get_segments()[0]
    (_, y_low), (_, y_high) = bars[1].get_segments()[0]
    assert (x_low, x_high) == pytest.approx((0.85 - statistics.stdev(a_x), 0.85 + statistics.stdev(a_x)))
    assert (y_low, y_high) == pytest.approx((0.6 - statistics.stdev(a_y), 0.6 + statistics.stdev(a_y)))
    assert not ax.containers[2].has_xerr and not ax.containers[2].has_yerr  # c has one run
    front = next(line for line in ax.lines if line.get_label() == "front")
    assert np.allclose(front.get_xydata(), [(0.65, 0.85), (0.65, 0.6), (0.85, 0.6)])  # c is dominated
    dots = np.concatenate([c.get_offsets() for c in _dots(ax)])
    assert sorted(map(tuple, dots.tolist())) == sorted((x, y) for _, x, y in runs)
    assert ax.get_xlabel() == "left.acc (higher is better)"
    # lower is better on y: c (0.5, 0.5) is now on the front
    fig = plots.pareto_figure(runs, "acc", "abs_err", maximize=(True, False))
    front = next(line for line in fig.axes[0].lines if line.get_label() == "front")
    assert np.allclose(front.get_xydata(), [(0.5, 0.5), (0.5, 0.6), (0.85, 0.6)])
    assert fig.axes[0].get_ylabel() == "abs_err (lower is better)"
    _is_png(plots.pareto_chart(runs, "left.acc", "right.acc", tmp_path / "pareto.png", title="two tasks"))


def test_pareto_chart_tells_more_groups_than_colours_apart_by_marker():
    runs = [(f"g{i}", float(i), float(i % 3)) for i in range(len(plots.COLORS) + 1)]
    ax = plots.pareto_figure(runs, "x", "y").axes[0]
    styles = [(c.lines[0].get_color(), c.lines[0].get_marker()) for c in ax.containers]
    assert len(styles) == len(runs) and len(set(styles)) == len(runs)  # the 11th group: first colour, squares


# --------------------------------------------------------------------------- curves


def test_curve_band_averages_the_seeds_that_reach_each_epoch():
    seeds = [[(1, 0.5), (2, 0.6), (3, 0.7)], [(1, 0.4), (2, 0.8)], [(2, 0.3), (1, 0.6)]]
    band = plots.curve_band(seeds)
    table = {1: [0.5, 0.4, 0.6], 2: [0.6, 0.8, 0.3], 3: [0.7]}
    assert [b[0] for b in band] == [1, 2, 3]
    for epoch, mean, std, n in band:
        values = np.array(table[epoch])
        assert n == len(values)
        assert mean == pytest.approx(values.mean())
        assert std == (None if n == 1 else pytest.approx(values.std(ddof=1)))


def test_curve_chart_draws_mean_lines_and_std_bands_and_says_where_seeds_are_missing(tmp_path):
    curves = {
        "equal": [[(1, 0.5), (2, 0.6), (3, 0.7)], [(1, 0.4), (2, 0.8)]],
        "mgda": [[(1, 0.2), (2, 0.3)], [(1, 0.4), (2, 0.5)]],
    }
    fig = plots.curve_figure(curves, "val left.acc")
    ax = fig.axes[0]
    assert np.allclose(ax.lines[0].get_xydata(), [(1, 0.45), (2, 0.7), (3, 0.7)])
    assert np.allclose(ax.lines[1].get_xydata(), [(1, 0.3), (2, 0.4)])
    s1, s2 = np.std([0.5, 0.4], ddof=1), np.std([0.6, 0.8], ddof=1)
    outline = ax.collections[0].get_paths()[0].vertices
    for point in [(1, 0.45 - s1), (1, 0.45 + s1), (2, 0.7 - s2), (2, 0.7 + s2), (3, 0.7)]:
        assert np.isclose(outline, point).all(axis=1).any(), point
    assert ax.get_ylabel() == "val left.acc"
    caption = " ".join(t.get_text() for t in fig.texts)
    assert "equal: epoch 3 from 1 of 2 seeds" in caption and "mgda:" not in caption
    _is_png(plots.curve_chart(curves, tmp_path / "curves.png", "val left.acc", title="Multi-Fashion"))


def test_one_unnamed_group_draws_no_legend_and_no_warning():
    """A sweep of seeds only has one group labelled "": no legend (matplotlib would warn that none has a label)."""
    fig = plots.curve_figure({"": [[(1, 0.5), (2, 0.6)]]}, "val acc")
    assert fig.axes[0].get_legend() is None and len(fig.axes[0].lines) == 1


# --------------------------------------------------------------------------- heatmap


def test_heatmap_shows_the_accuracy_matrix_annotated_with_blank_cells(tmp_path):
    matrix = [[0.9, None], [0.55, 0.875]]
    fig = plots.heatmap_figure(matrix, ["t1", "t2"], ["t1", "t2"], title="finetune")
    ax = fig.axes[0]
    data = ax.images[0].get_array()
    assert data.mask.tolist() == [[False, True], [False, False]]
    assert np.allclose(data.filled(-1), [[0.9, -1], [0.55, 0.875]])
    assert ax.images[0].get_clim() == (0.0, 1.0)
    texts = {(t.get_position(), t.get_text()) for t in ax.texts}
    assert texts == {((0, 0), "0.900"), ((0, 1), "0.550"), ((1, 1), "0.875")}
    assert ax.get_ylabel() == "after training task" and ax.get_xlabel() == "accuracy on task"
    _is_png(plots.heatmap_chart(matrix, ["t1", "t2"], ["t1", "t2"], tmp_path / "R.png", title="finetune"))


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "draw,message",
    [
        (lambda p: plots.bar_chart({"a": {"acc": [0.5, float("nan")]}}, p), "bar chart: a acc is nan"),
        (lambda p: plots.bar_chart({}, p), "no groups"),
        (lambda p: plots.pareto_chart([("a", 1.0, float("inf"))], "x", "y", p), "Pareto chart: a y is inf"),
        (lambda p: plots.curve_chart({"a": [[(1, 0.5), (1, 0.6)]]}, p, "acc"), "gives epoch 1 twice"),
        (lambda p: plots.heatmap_chart([[0.5, None]], ["t1"], ["t1"], p), "must have 1 rows of 1 values"),
        (lambda p: plots.heatmap_chart([[None]], ["t1"], ["t1"], p), "every value is None"),
        (lambda p: plots.bar_chart({"a": {"acc": [0.5]}}, p.with_suffix(".pdf")), "must end in .png"),
    ],
)
def test_bad_input_is_one_user_error_and_writes_nothing(tmp_path, draw, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        draw(tmp_path / "plot.png")
    assert list(tmp_path.iterdir()) == []


def test_missing_matplotlib_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # `import` of it raises ImportError
    with pytest.raises(UserError) as err:
        plots.bar_chart({"a": {"acc": [0.5]}}, tmp_path / "bars.png")
    assert str(err.value) == "plots need matplotlib: pip install 'mtl[plots]'"
    assert list(tmp_path.iterdir()) == []


def test_the_figure_title_stays_above_every_panel_title():
    """Seven panels of sixteen groups (the scenes' table): the title does not cover the first row's panel titles."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    groups = {f"method{i}": {f"metric{k}": [0.1 * k, 0.1 * k + 0.01] for k in range(7)} for i in range(16)}
    fig = plots.bar_figure(groups, "test metrics by weighting.name, mean ± std over seeds")
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    title = fig._suptitle.get_window_extent(renderer)
    for ax in fig.axes:
        assert ax.title.get_window_extent(renderer).y1 <= title.y0 + 1, ax.get_title()


def test_many_curves_get_distinct_lines_and_a_legend_beside_them():
    curves = {f"method{i}": [[(1, 0.1 * i), (2, 0.1 * i + 0.05)]] for i in range(16)}
    fig = plots.curve_figure(curves, "acc")
    lines = fig.axes[0].get_lines()
    assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 16
    fig.canvas.draw()
    legend = fig.axes[0].get_legend().get_window_extent()
    assert legend.x0 >= fig.axes[0].get_window_extent().x1  # right of the plot area, not over the lines
