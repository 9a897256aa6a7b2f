"""The pictures of ``mtl compare --plots`` and a sweep's results.md, from hand-written runs: which numbers each
chart gets (checked against the runs' values), the files written, and the table alone without matplotlib."""

import json

import pytest
from PIL import Image
from test_compare import config, fake_run

from mtl.cli import main
from mtl.workflows import report
from mtl.workflows.compare import aggregate

# seg.miou (higher is better) and depth.abs_err (lower is better) of two methods, two seeds each, per epoch
RUNS = {
    ("equal", 0): [(0.40, 0.50), (0.50, 0.40)],
    ("equal", 1): [(0.44, 0.46), (0.54, 0.38)],
    ("pcgrad", 0): [(0.30, 0.45), (0.45, 0.30)],
    ("pcgrad", 1): [(0.36, 0.41), (0.47, 0.34)],
}


def _runs(tmp_path):
    for (method, seed), epochs in RUNS.items():
        tasks = [{"seg": {"miou": m, "loss": 1.0}, "depth": {"abs_err": a, "loss": 1.0}} for m, a in epochs]
        path = tmp_path / "runs" / method / f"s{seed}"
        fake_run(path, tasks[-1], method, config=config(seed, method), epochs=tasks, best_epoch=2)
        summary = json.loads((path / "summary.json").read_text())
        summary["tasks"]["seg"]["primary"], summary["tasks"]["depth"]["primary"] = "miou", "abs_err"
        (path / "summary.json").write_text(json.dumps(summary))
    return str(tmp_path / "runs")


def test_charts_get_each_runs_values_and_the_files_are_pngs(tmp_path, monkeypatch):
    calls = {}
    for name in ("bar_chart", "pareto_chart", "curve_chart"):
        real = getattr(report, name)

        def spy(*args, _real=real, _name=name, **kwargs):
            calls.setdefault(_name, []).append(args)
            return _real(*args, **kwargs)

        monkeypatch.setattr(report, name, spy)
    written = report.write_plots(aggregate([_runs(tmp_path)]), tmp_path / "plots")
    assert sorted(p.name for p in written) == ["bars.png", "curves_depth.png", "curves_seg.png", "pareto.png"]
    for p in written:
        with Image.open(p) as image:
            assert image.format == "PNG" and min(image.size) > 100

    ((bars, *_),) = calls["bar_chart"]
    last = {k: epochs[-1] for k, epochs in RUNS.items()}
    for method in ("equal", "pcgrad"):
        label = method  # the key all groups vary alone goes to the title
        assert sorted(bars[label]["seg.miou"]) == pytest.approx(sorted(last[(method, s)][0] for s in (0, 1)))
        assert sorted(bars[label]["depth.abs_err"]) == pytest.approx(sorted(last[(method, s)][1] for s in (0, 1)))
        assert not any(k.endswith("loss") for k in bars[label])

    ((points, x_name, y_name, _, maximize, _),) = calls["pareto_chart"]
    assert (x_name, y_name, maximize) == ("seg.miou", "depth.abs_err", (True, False))
    expected = sorted((m, v[0], v[1]) for (m, _), v in last.items())
    assert sorted(points) == [pytest.approx(p) for p in expected]

    curves = {args[2]: args[0] for args in calls["curve_chart"]}
    seeds = curves["miou"]["pcgrad"]
    assert sorted(seeds) == sorted([[(1, 0.30), (2, 0.45)], [(1, 0.36), (2, 0.47)]])


def test_labels_drop_the_one_key_all_groups_vary():
    assert report.short_labels(["weighting.name=equal", "weighting.name=pcgrad"]) == (
        {"weighting.name=equal": "equal", "weighting.name=pcgrad": "pcgrad"},
        " by weighting.name",
    )
    mixed = ["optim.lr=0.1 weighting.name=equal", "optim.lr=0.2 weighting.name=equal"]
    assert report.short_labels(mixed) == ({m: m for m in mixed}, "")
    assert report.short_labels(["stage=a", "lr=1"]) == ({"stage=a": "stage=a", "lr=1": "lr=1"}, "")


def test_compare_plots_option_and_a_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    runs = _runs(tmp_path)
    assert main(["compare", runs, "--plots", str(tmp_path / "pictures")]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'pictures' / 'pareto.png'}" in out and (tmp_path / "pictures" / "bars.png").is_file()

    report.write_report(aggregate([runs]), tmp_path / "with")
    text = (tmp_path / "with" / "results.md").read_text()
    assert "| weighting.name=equal | 2 |" in text and "![bars](plots/bars.png)" in text

    monkeypatch.setattr(report, "have_matplotlib", lambda: False)
    report.write_report(aggregate([runs]), tmp_path / "without")
    text = (tmp_path / "without" / "results.md").read_text()
    assert "| weighting.name=pcgrad | 2 |" in text and "![" not in text
    assert not (tmp_path / "without" / "plots").exists()
