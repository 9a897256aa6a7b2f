"""delta_m on hand-made numbers, baseline files, and the compare table on hand-written summaries."""

import json

import pytest

from mtl.cli import main
from mtl.core.errors import UserError
from mtl.engine.monitor import delta_m, load_baseline
from mtl.workflows.compare import compare_table, write_baseline

DIRECTIONS = {"seg": {"miou": True, "loss": False}, "depth": {"abs_err": False, "loss": False}}


def test_delta_m_is_the_signed_mean_relative_change():
    base = {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}
    # miou +10% (better), abs_err +10% (worse): they cancel
    assert delta_m({"seg": {"miou": 0.55}, "depth": {"abs_err": 0.44}}, base, DIRECTIONS) == pytest.approx(0.0)
    # miou +10%, abs_err -20% (better): (10 + 20) / 2
    assert delta_m({"seg": {"miou": 0.55}, "depth": {"abs_err": 0.32}}, base, DIRECTIONS) == pytest.approx(15.0)
    assert delta_m({"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}, base, DIRECTIONS) == 0.0


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "must map tasks"),
        ("seg: 0.5", "must map metrics"),
        ("seg: {miou: 0}", "non-zero number"),
        ("seg: {miou: high}", "non-zero number"),
        ("road: {miou: 0.5}", "names task 'road'"),
        ("seg: {iou: 0.5}", "no metric 'iou'"),
        ("seg: {miou: [", "not valid YAML"),
    ],
)
def test_bad_baseline_files_are_clear_errors(tmp_path, text, message):
    path = tmp_path / "b.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        load_baseline(path, DIRECTIONS)


def test_missing_baseline_file_says_how_to_make_one(tmp_path):
    with pytest.raises(UserError, match="--write-baseline"):
        load_baseline(tmp_path / "none.yaml")


def fake_run(path, tasks, weighting=""):
    path.mkdir(parents=True)
    summary = {
        "weighting": weighting,
        "tasks": {t: {"directions": DIRECTIONS[t]} for t in tasks},
        "final": {"val": {"tasks": tasks}},
        "best": {"val": {"tasks": tasks}},
    }
    (path / "summary.json").write_text(json.dumps(summary))
    return str(path)


def test_write_baseline_merges_single_task_runs_and_rejects_duplicates(tmp_path):
    a = fake_run(tmp_path / "a", {"seg": {"miou": 0.5, "loss": 1.0}})
    b = fake_run(tmp_path / "b", {"depth": {"abs_err": 0.4, "loss": 0.3}})
    base = write_baseline([a, b], tmp_path / "base.yaml")
    assert base == {"seg": {"miou": 0.5}, "depth": {"abs_err": 0.4}}
    assert load_baseline(tmp_path / "base.yaml", DIRECTIONS) == base
    with pytest.raises(UserError, match="task 'seg' is in both"):
        write_baseline([a, a], tmp_path / "twice.yaml")


def test_compare_table_over_a_folder_of_runs(tmp_path, capsys):
    base = tmp_path / "base.yaml"
    base.write_text("seg: {miou: 0.5}\ndepth: {abs_err: 0.4}\n")
    fake_run(
        tmp_path / "runs" / "x", {"seg": {"miou": 0.55, "loss": 1}, "depth": {"abs_err": 0.32, "loss": 1}}, "pcgrad"
    )
    fake_run(tmp_path / "runs" / "y", {"seg": {"miou": 0.6, "loss": 1}}, "equal")
    table = compare_table([str(tmp_path / "runs")], str(base)).splitlines()
    assert table[0] == "| run | weighting | seg.miou | depth.abs_err | Δm % |"
    assert table[2].endswith("| pcgrad | 0.5500 | 0.3200 | +15.00 |")
    assert table[3].endswith("| equal | 0.6000 |  | n/a |")
    assert main(["compare", str(tmp_path / "nothing")]) == 2
    assert "holds no run" in capsys.readouterr().err
