"""benchmarks/weighting.py on tiny scenes: a user's method from --import, several seeds, mean ± std cells and Δm
recomputed from the runs' summaries; bad input refused in one line before any run trains."""

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

_spec = importlib.util.spec_from_file_location("bench_weighting", ROOT / "benchmarks" / "weighting.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

METHOD = """
from mtl.plugins import WEIGHTINGS
from mtl.weighting.base import LossWeighting

if "first_task_double" not in WEIGHTINGS:  # the test module may be imported again under another path

    @WEIGHTINGS.register("first_task_double")
    class FirstTaskDouble(LossWeighting):
        def forward(self, losses, shared=()):
            w = losses.new_ones(self.num_tasks)
            w[0] = 2.0
            self.last_weights.copy_(w)
            return (w * losses).sum()
"""


def _scenes(tmp_path):
    """configs/mtl_scenes.yaml shrunk to a second per run, with two tasks (seg, label): two are set to null."""
    return [
        str(ROOT / "configs" / "mtl_scenes.yaml"),
        f"data.root={tmp_path / 'scenes'}",
        "data.options={size: 16, train_size: 16, val_size: 8, test_size: 8, seed: 0}",
        "data.batch_size=8",
        "model.encoder_options.widths=[8,16,16,32]",
        "tasks.seg.head.options.channels=8",
        "tasks.depth=null",
        "tasks.normal=null",
        "train.epochs=1",
        "train.log_images=0",
    ]


def _cell(text):
    """(mean, std or None) of a ``0.1234 ± 0.0012`` cell."""
    parts = [float(p.replace(" ms", "")) for p in text.split("±")]
    return parts[0], (parts[1] if len(parts) > 1 else None)


def _summaries(out, name):
    found = sorted(out.glob(f"{name}/*/summary.json"))
    assert len(found) == 1, found
    run_dir = found[0].parent
    return json.loads(found[0].read_text()), yaml.safe_load((run_dir / "config.yaml").read_text())


def _mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _close(cell, values, decimals):
    mean, std = _cell(cell)
    expected_mean, expected_std = _mean_std(values)
    tol = 0.6 * 10**-decimals
    assert mean == pytest.approx(expected_mean, abs=tol)
    assert (std is None) == (expected_std is None)
    if std is not None:
        assert std == pytest.approx(expected_std, abs=tol)


def test_seeds_and_a_method_from_import_give_mean_std_and_delta_m_of_the_runs(tmp_path, capsys):
    module = tmp_path / "my_weighting.py"
    module.write_text(METHOD)
    out = tmp_path / "runs"
    argv = _scenes(tmp_path) + ["--methods", "equal,first_task_double", "--seeds", "0,1"]
    argv += ["--import", str(module), "--out", str(out)]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "mean ± sample std over seeds 0,1" in lines[0]
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header[0] == "run" and header[-4:] == ["Δm % (flat)", "Δm % (LibMTL Δp)", "s/step", "× equal"]
    rows = {r[0]: dict(zip(header, r)) for r in ([c.strip() for c in line.strip("|").split("|")] for line in lines[4:])}
    assert list(rows) == ["single-task seg", "single-task label", "equal", "first_task_double"]

    runs = {}
    for label, prefix in [("single-task seg", "single_seg"), ("single-task label", "single_label")]:
        runs[label] = [_summaries(out, f"mtl_scenes_{prefix}_seed{s}") for s in (0, 1)]
    for method in ("equal", "first_task_double"):
        runs[method] = [_summaries(out, f"mtl_scenes_{method}_seed{s}") for s in (0, 1)]
    for label, pairs in runs.items():
        assert [c["train"]["seed"] for _, c in pairs] == [0, 1]
    assert [s["weighting"] for s, _ in runs["first_task_double"]] == ["first_task_double"] * 2
    assert set(runs["equal"][0][0]["tasks"]) == {"seg", "label"}  # the tasks set to null are not trained

    def metric(summary, task, name):
        return summary["final"]["val"]["tasks"][task][name]

    for label, pairs in runs.items():
        for column in ("seg.miou", "seg.pixel_acc", "label.acc"):
            task, name = column.split(".")
            if label.startswith("single-task") and task not in label:
                assert rows[label][column] == ""
                continue
            _close(rows[label][column], [metric(s, task, name) for s, _ in pairs], 4)
        steps = [s["time"]["mean_train_epoch_s"] / s["steps_per_epoch"] * 1000 for s, _ in pairs]
        _close(rows[label]["s/step"], steps, 1)

    # delta_m by hand: the baseline is each single-task metric's mean over the seeds (zeros left out)
    base = {}
    for task, names in [("seg", ("miou", "pixel_acc")), ("label", ("acc",))]:
        for name in names:
            value = statistics.mean(metric(s, task, name) for s, _ in runs[f"single-task {task}"])
            if value != 0:
                base[(task, name)] = value
    assert base
    for method in ("equal", "first_task_double"):
        deltas = [
            100 / len(base) * sum((metric(s, t, m) - b) / b for (t, m), b in base.items())  # all higher is better
            for s, _ in runs[method]
        ]
        _close(rows[method]["Δm % (flat)"], deltas, 2)
        per_task = {t: [(m, b) for (tt, m), b in base.items() if tt == t] for t, _ in base}
        libmtl = [
            100
            / len(per_task)
            * sum(sum((metric(s, t, m) - b) / b for m, b in ms) / len(ms) for t, ms in per_task.items())
            for s, _ in runs[method]
        ]
        _close(rows[method]["Δm % (LibMTL Δp)"], libmtl, 2)
    step = {
        k: statistics.mean(s["time"]["mean_train_epoch_s"] / s["steps_per_epoch"] for s, _ in v)
        for k, v in runs.items()
    }
    assert float(rows["first_task_double"]["× equal"]) == pytest.approx(
        step["first_task_double"] / step["equal"], abs=0.006
    )
    assert rows["equal"]["× equal"] == "1.00" and rows["single-task seg"]["× equal"] == ""


@pytest.mark.parametrize(
    "args,message",
    [
        (["--methods", "equal,not_a_method"], "--methods: unknown weighting 'not_a_method'"),
        (["--seeds", "0,one"], "--seeds must be comma-separated whole numbers"),
        (["--seeds", "1,1"], "--seeds names 1 twice"),
        (["--metrics", "miou,nope"], "--metrics: the tasks report no nope"),
        (["tasks.label=null"], "has one task (seg); the benchmark needs a multitask config"),
        (["--import", "no_such_module_here"], "cannot import plugin module 'no_such_module_here'"),
        (["--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["weighting.options={nope: 1}"], "unknown option weighting.options.nope for weighting 'equal'"),
    ],
)
def test_bad_input_is_one_line_exit_2_before_any_run(tmp_path, capsys, args, message):
    out = tmp_path / "runs"
    try:
        code = bench.main(_scenes(tmp_path) + args + ["--out", str(out)])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("mtl: error: ") and message in err[-1], err
    assert not out.exists()


def test_each_run_gets_its_seed_and_method_and_only_the_configs_own_method_its_options():
    raw = {
        "name": "x",
        "tasks": {"a": {}, "b": {}},
        "weighting": {"name": "cagrad", "options": {"c": 0.4}, "grad_on": "representation"},
    }
    own = bench._with(raw, "x_cagrad_seed3", 3, None, "cagrad")
    assert own["weighting"] == raw["weighting"] and own["train"] == {"seed": 3} and own["name"] == "x_cagrad_seed3"
    other = bench._with(raw, "x_pcgrad_seed3", 3, None, "pcgrad")
    assert other["weighting"] == {"name": "pcgrad", "grad_on": "representation"}
    single = bench._with(raw, "x_single_b_seed0", 0, ["b"], "equal")
    assert single["tasks"] == {"b": {}} and single["weighting"]["name"] == "equal"
    assert raw["weighting"]["options"] == {"c": 0.4} and "train" not in raw  # the config itself is left as it was
