"""mtl lr-find: the exponential schedule, the smoothing, fastai's stop rule, Lightning's suggestion; one tiny run."""

import json
import math

import numpy as np
import pytest
import yaml
from conftest import make_folder, tiny_config
from test_bad_input import refused

from mtl.cli import main
from mtl.workflows.lr_find import diverged, lr_schedule, smooth, suggest

pytestmark = pytest.mark.usefixtures("one_thread")


def test_schedule_is_exactly_exponential_from_start_to_end():
    lrs = lr_schedule(1e-6, 1.0, 13)
    assert lrs[0] == 1e-6 and lrs[-1] == pytest.approx(1.0, rel=1e-12)
    np.testing.assert_allclose(lrs, np.geomspace(1e-6, 1.0, 13), rtol=1e-12)
    ratios = [b / a for a, b in zip(lrs, lrs[1:])]
    assert max(ratios) == pytest.approx(min(ratios), rel=1e-12)


def test_smoothing_is_the_bias_corrected_moving_average():
    assert smooth([1.0, 2.0], beta=0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 2.0) / 0.75])
    assert smooth([3.0] * 50) == pytest.approx([3.0] * 50)  # bias correction: a constant stays itself
    x = np.random.default_rng(0).normal(size=40)
    loop = [sum(0.98 ** (k - j) * 0.02 * x[j] for j in range(k + 1)) / (1 - 0.98 ** (k + 1)) for k in range(40)]
    np.testing.assert_allclose(smooth(list(x)), loop, rtol=1e-10)


def test_stop_rule_is_four_times_the_minimum_before_or_not_finite():
    assert not diverged([1.0])
    assert not diverged([1.0, 0.5, 2.0])
    assert diverged([1.0, 0.5, 2.01])
    assert diverged([1.0, math.nan]) and diverged([1.0, math.inf])


def test_suggestion_is_the_steepest_descent_against_log_lr():
    lrs = list(np.geomspace(1e-5, 1.0, 61))
    x = np.log10(lrs)
    curve = list(1 - np.tanh(3 * (x + 2)))  # falls fastest at lr = 1e-2, index 36
    assert suggest(lrs, curve) == 36
    steep_start = [-100.0 * (10 - i) for i in range(10)] + curve[10:]  # the skipped first 10 points
    assert suggest(lrs, steep_start) == 36
    assert suggest(lrs[:12], curve[:12]) is None  # one point left after skipping 10 and 1


def _config(tmp_path, **overrides):
    root = make_folder(tmp_path / "data", per_class=(8, 4))
    cfg = tiny_config(root, tmp_path / "runs", **overrides)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_tiny_run_writes_its_files_and_prints_the_override(tmp_path, capsys):
    path = _config(tmp_path, **{"optim.layer_decay": 0.8, "model.freeze": {"until": "stage1"}})
    assert main(["lr-find", str(path), "--steps", "16", "--start-lr", "1e-4", "--end-lr", "1"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    (out,) = list((tmp_path / "runs" / "tiny").iterdir())
    assert out.name.endswith("-lr_find") and len(lines) == 1
    result = json.loads((out / "lr_find.json").read_text())
    n = len(result["lrs"])
    assert n == len(result["losses"]) == len(result["smoothed"]) and 2 <= n <= 16
    np.testing.assert_allclose(result["lrs"], np.geomspace(1e-4, 1, 16)[:n], rtol=1e-12)
    assert result["stopped_early"] == (n < 16)
    lr = result["suggestion"]
    assert lr is not None and lines[0].startswith(f"suggested lr {lr:.3g}") and f"optim.lr={lr:.3g}" in lines[0]
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    pytest.importorskip("matplotlib")
    assert (out / "lr_find.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "1"], ["--steps must be at least 2"]),
        (["--start-lr", "1", "--end-lr", "1"], ["0 < start < end"]),
        (["--start-lr", "0"], ["0 < start < end"]),
    ],
)
def test_bad_ranges_exit_2_and_write_nothing(args, words, tmp_path, capsys):
    refused(capsys, ["lr-find", _config(tmp_path), *args], *words, runs=tmp_path / "runs")


@pytest.mark.parametrize(
    "args, words",
    [
        ([], ["name the one to test with --stage (a, b, c)"]),
        (["--stage", "z"], ["--stage z: no such stage", "a, b, c"]),
        (["--stage", "c"], ["stage 'c' starts from stage 'a''s trained weights"]),
    ],
)
def test_a_staged_config_needs_a_stage_that_starts_from_no_other(args, words, tmp_path, capsys):
    stages = [{"name": "a"}, {"name": "b", "optim": {"lr": 0.5}}, {"name": "c", "model": {"weights": "stage:a"}}]
    refused(capsys, ["lr-find", _config(tmp_path, stages=stages), *args], *words, runs=tmp_path / "runs")


def test_a_stage_is_tested_with_its_own_settings(tmp_path, capsys):
    stages = [{"name": "a"}, {"name": "b", "model": {"freeze": "all"}}]
    path = _config(tmp_path, stages=stages)
    assert main(["lr-find", str(path), "--stage", "b", "--steps", "4", "--start-lr", "1e-3", "--end-lr", "1e-2"]) == 0
    (out,) = list((tmp_path / "runs" / "b").iterdir())  # the stage's name
    assert json.loads((out / "lr_find.json").read_text())["config"]["model"]["freeze"] == "all"
