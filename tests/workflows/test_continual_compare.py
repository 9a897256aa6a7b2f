"""``mtl compare`` of continual runs: mean ± std over seeds per method, mean accuracy matrices, ACC vs params."""

import json
import statistics

import pytest
import yaml

from mtl.cli import main


def fake_root(folder, seed, acc_a, bwt, test=True):
    """A finished continual run root: config.yaml and a summary.json with two tasks and two methods."""
    folder.mkdir(parents=True)
    config = {"name": "seq", "out_dir": "runs", "train": {"seed": seed}, "continual": {"methods": ["a", "b"]}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))

    def method(acc, bwt, params):
        R = [[0.9], [0.9 + bwt, 2 * acc - 0.9 - bwt]]
        r = {"R": R, "acc": acc, "bwt": bwt, "forgetting": -bwt, "params_per_task": params, "time_s": [2.0, 3.0]}
        r["memory"] = [{"peak_mib": 10.0}, {"peak_mib": 30.0 + seed}]
        r["splits"] = ["val", "test"] if test else ["val"]
        if test:
            r["R_test"] = [[row_value - 0.1 for row_value in row] for row in R]
            r["test"] = {"acc": acc - 0.1, "bwt": bwt, "forgetting": -bwt}
        return r

    summary = {"tasks": ["t0", "t1"], "methods": {"a": method(acc_a, bwt, [100, 50]), "b": method(0.5, 0.0, [10, 10])}}
    (folder / "summary.json").write_text(json.dumps(summary))


def test_continual_runs_are_averaged_over_seeds(tmp_path, capsys):
    fake_root(tmp_path / "s0", 0, 0.8, -0.2)
    fake_root(tmp_path / "s1", 1, 0.6, -0.1)
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "seq: 2 run(s), tasks t0 → t1; metrics on the test split" in out
    (row,) = [line for line in out.splitlines() if line.startswith("| a |")]
    cells = [c.strip() for c in row.strip("|").split("|")]
    sd = statistics.stdev([0.7, 0.5])
    assert cells[:4] == ["a", "2", f"0.6000 ± {sd:.4f}", f"-0.1500 ± {statistics.stdev([-0.2, -0.1]):.4f}"]
    assert cells[4] == "n/a" and cells[-3] == "75 ± 0" and cells[-2] == "5 ± 0"
    assert cells[-1] == f"30 ± {statistics.stdev([30.0, 31.0]):.0f}"


def test_without_a_test_split_the_validation_split_is_read(tmp_path, capsys):
    fake_root(tmp_path / "s0", 0, 0.8, -0.2, test=False)
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "metrics on the val split" in out and "| a | 1 | 0.8000 |" in out


def test_continual_plots_and_refusals(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    fake_root(tmp_path / "runs" / "s0", 0, 0.8, -0.2)
    fake_root(tmp_path / "runs" / "s1", 1, 0.6, -0.1)
    assert main(["compare", str(tmp_path / "runs"), "--plots", str(tmp_path / "plots")]) == 0
    for name in ("accuracy_a.png", "accuracy_b.png", "acc_vs_params.png"):
        assert (tmp_path / "plots" / name).is_file()
    assert main(["compare", str(tmp_path / "runs"), "--time"]) == 2
    assert "--time does not apply to continual runs" in capsys.readouterr().err
    other = tmp_path / "runs" / "single"
    other.mkdir()
    (other / "summary.json").write_text(json.dumps({"final": {}}))
    assert main(["compare", str(tmp_path / "runs")]) == 2
    assert "compare continual runs on their own" in capsys.readouterr().err


def test_mean_matrix_is_the_elementwise_mean():
    from mtl.workflows.continual_compare import mean_matrix

    views = [{"R": [[1.0], [0.5, 0.7]]}, {"R": [[0.0], [0.1, 0.3]]}]
    assert mean_matrix(views) == [[0.5, None], [pytest.approx(0.3), pytest.approx(0.5)]]


def test_a_sweep_of_continual_runs_writes_their_report(tmp_path):
    from mtl.workflows.continual_compare import find_continual_runs, write_continual_report

    fake_root(tmp_path / "p" / "seed0", 0, 0.8, -0.2)
    fake_root(tmp_path / "p" / "seed1", 1, 0.6, -0.1)
    roots, _, others = find_continual_runs([tmp_path])
    report = write_continual_report(roots, tmp_path)
    assert not others and report.read_text().startswith("seq: 2 run(s)")
