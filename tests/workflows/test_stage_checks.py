"""A staged run checks every stage before it writes anything: a refusal (of any stage, or of the first stage's data)
is one line, exit 2, and leaves no run directory, not even ``<time>/config.yaml``; a stage refused after an earlier
one trained keeps the run, to be resumed."""

import json

import pytest
import yaml
from conftest import make_folder, tiny_config
from test_bad_input import refused

from mtl.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def data(tmp_path):
    return make_folder(tmp_path / "data", per_class=(4, 2), size=16)


def staged(tmp_path, data, second, **top):
    """A two-stage config (stage b patched by ``second``) with its runs in ``tmp_path/runs``."""
    raw = tiny_config(data, tmp_path / "runs", **{"train.epochs": 1, "train.log_images": 0, **top})
    raw["stages"] = [{"name": "a"}, {"name": "b", **second}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "second, words",
    [
        ({"model": {"weights": "/nowhere/w.pth"}}, ["stage 'b'", "/nowhere/w.pth"]),
        ({"model": {"weights": "stage:a", "freeze": {"until": "stage9"}}}, ["stage 'b'", "stage9"]),
        ({"tasks": {"label": {"head": {"name": "lineer"}}}}, ["stage 'b'", "tasks.label.head", "lineer"]),
        ({"weighting": {"name": "equal", "options": {"tau": 2}}}, ["stage 'b'", "weighting.options.tau"]),
        ({"train": {"hooks": ["no_such_hook"]}}, ["stage 'b'", "no_such_hook"]),
        ({"data": {"options": {"colour": 1}}}, ["stage 'b'", "data.options.colour"]),
        ({"data": {"image_size": 8, "resize_size": 8}}, ["stage 'b'", "data.image_size=8", "small_cnn"]),
    ],
    ids=["weights file", "freeze", "head", "weighting option", "hook", "data option", "image size"],
)
def test_a_later_stage_is_refused_before_anything_is_written(tmp_path, data, capsys, second, words):
    refused(capsys, ["train", staged(tmp_path, data, second)], *words, runs=tmp_path / "runs")


def test_a_refusal_by_the_first_stages_data_leaves_no_run_behind(tmp_path, data, capsys):
    path = staged(tmp_path, data, {}, **{"data.root": str(tmp_path / "missing")})
    refused(capsys, ["train", path], str(tmp_path / "missing"), runs=tmp_path / "runs")


def test_a_stage_refused_after_an_earlier_one_trained_keeps_the_run(tmp_path, data, capsys):
    path = staged(tmp_path, data, {"data": {"root": str(tmp_path / "missing")}})
    assert main(["train", str(path)]) == 2
    assert str(tmp_path / "missing") in capsys.readouterr().err
    (root,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((root / "a" / "summary.json").read_text())["epochs"] == 1
    assert (root / "config.yaml").is_file() and not (root / "b").exists()  # `mtl train --resume` continues it


def test_stage_budgets_in_steps_pass_the_checks(tmp_path, data):
    """A stage with train.steps and unfreeze events in steps (or in epochs past train.epochs, which steps leave
    unused) is not refused by the checks before the data: its steps per epoch are not known yet."""
    second = {
        "model": {"freeze": {"until": "stage4"}},
        "train": {"steps": 4, "unfreeze": [{"step": 1, "modules": ["stage4"]}, {"epoch": 1, "modules": ["stage3"]}]},
    }
    assert main(["train", str(staged(tmp_path, data, second)), "data.batch_size=4"]) == 0
    (root,) = (tmp_path / "runs" / "tiny").iterdir()
    assert json.loads((root / "b" / "summary.json").read_text())["steps"] == 4
