"""A run with data.test_split: validation carved from training data selects the checkpoint, the test split is scored
once at the end with it and with the final weights, into summary.json, the end line, TensorBoard and results.md."""

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_folder, tiny_config

from mtl.build.data import build_dataset
from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.checkpoint import load_checkpoint
from mtl.plugins import HOOKS, Hook
from mtl.workflows.predict import open_run
from mtl.workflows.stages import stage_table
from mtl.workflows.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


class FirstEpochBest(Hook):
    """Makes every later epoch score lower than the first, so that the best checkpoint is not the final weights."""

    def before_train(self, trainer):
        count = itertools.count()
        trainer.monitor = lambda metrics: -next(count)


@pytest.fixture(scope="module")
def tested_run(tmp_path_factory, one_thread):
    """Three epochs on a colour folder: a quarter of train carved for validation, the folder's val/ as the test
    split, the first epoch forced to be the best."""
    tmp = tmp_path_factory.mktemp("tested")
    root = make_folder(tmp / "colors", per_class=(16, 8))
    raw = tiny_config(root, tmp / "runs", **{"data.val_split": 0.25, "data.test_split": "val", "train.epochs": 3})
    raw["data"]["pipeline"] = "items"
    raw["train"]["hooks"] = ["first_epoch_best"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(HOOKS._entries, "first_epoch_best", FirstEpochBest)
        cfg = build_config(raw)
        summary = run(cfg)
    return cfg, summary


def scored_by_hand(cfg, model, split):
    """Mean cross-entropy and accuracy of ``model`` on every image of ``split``, one image at a time."""
    data = build_dataset(cfg.data, split, train=False)
    losses, hits = [], []
    with torch.no_grad():
        for i in range(len(data)):
            item = data[i]
            logits = model(item["image"][None])["label"].float()
            losses.append(float(F.cross_entropy(logits, item["label"][None])))
            hits.append(int(logits.argmax(1)) == int(item["label"]))
    return sum(losses) / len(losses), sum(hits) / len(hits), len(data)


def test_test_split_is_scored_with_the_best_checkpoint_and_with_the_final_weights(tested_run):
    cfg, summary = tested_run
    assert summary["best"]["epoch"] == 1 and summary["final"]["epoch"] == 3
    loaded = open_run(summary["run_dir"])  # checkpoints/best.pt
    model = loaded.model.eval()
    for which, checkpoint in (("best", "best.pt"), ("last", "last.pt")):
        model.load_state_dict(load_checkpoint(f"{summary['run_dir']}/checkpoints/{checkpoint}")["model"])
        loss, acc, n = scored_by_hand(cfg, model, "val")
        got = summary["test"][which]
        assert n == 24 and got["loss"] == pytest.approx(loss, rel=1e-4)
        assert abs(got["acc"] - acc) <= 1 / n + 1e-9  # at most one near-tie decided otherwise in a batch
        assert set(got) == set(summary["best"]["val"]) and set(got["tasks"]) == {"label"}
    saved = json.loads(open(f"{summary['run_dir']}/summary.json").read())
    assert saved["test"] == summary["test"]
    assert saved["protocol"] == {
        "select": "val",
        "val": "25% of split train (class-stratified, data.split_seed 0)",
        "test": "val",
    }
    assert (saved["train_size"], saved["val_size"], saved["test_size"]) == (36, 12, 24)


def test_the_end_line_and_tensorboard_show_the_test_metrics(tested_run, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, summary = tested_run
    acc = EventAccumulator(summary["run_dir"])
    acc.Reload()
    best, last = acc.Scalars("test/best/acc"), acc.Scalars("test/last/label/acc")
    assert [(e.step, e.value) for e in best] == [(1, pytest.approx(summary["test"]["best"]["acc"]))]
    assert [(e.step, e.value) for e in last] == [(3, pytest.approx(summary["test"]["last"]["acc"]))]
    assert "loss/val" in acc.Tags()["scalars"]  # the training run's own events are still read with them


def test_end_line_names_test_of_best_and_final_epoch():
    from mtl.workflows.train import end_line

    phase = {"loss": 0.5, "acc": 0.75, "tasks": {"label": {"loss": 0.5, "acc": 0.75}}}
    summary = {
        "best": {"epoch": 1, "val": phase},
        "final": {"epoch": 3, "val": phase},
        "epochs": 3,
        "run_dir": "r",
        "test": {"best": {**phase, "acc": 0.912}, "last": {**phase, "acc": 0.5}},
    }
    line = end_line(summary, "auto")
    assert "test (best epoch): loss 0.5000 acc 0.9120" in line and "test (final epoch): loss 0.5000 acc 0.5000" in line
    assert "\n" not in line and "test" not in end_line({**summary, "test": None}, "auto")


def test_a_run_without_test_split_says_so_in_its_protocol(color_folder, tmp_path):
    summary = run(build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1})), quiet=True)
    assert "test" not in summary and summary["protocol"] == {"select": "val", "val": "split val", "test": None}


def stage(name, test_acc=None):
    phase = {"loss": 0.1, "acc": 0.8, "tasks": {}}
    summary = {
        "name": name,
        "train_size": 10,
        "best": {"epoch": 1, "val": phase},
        "final": {"epoch": 1, "val": phase},
        "time": {"mean_epoch_s": 1.0},
        "params": {"trainable": 1234},
    }
    if test_acc is not None:
        summary["test"] = {"best": {**phase, "acc": test_acc}, "last": phase}
    return summary


def test_stage_table_has_a_test_column_only_when_a_stage_has_a_test_split():
    table = stage_table([stage("a", 0.9125), stage("b")]).splitlines()
    assert "test acc (best epoch)" in table[0] and table[1].count("|") == table[0].count("|")
    assert "| a | 10 | 0.8000 | 0.8000 | 0.9125 | 1.00 | 1,234 |" == table[2]
    assert "| b | 10 | 0.8000 | 0.8000 | — | 1.00 | 1,234 |" == table[3]
    assert "test" not in stage_table([stage("a"), stage("b")])


def test_stage_table_shows_the_one_time_feature_caching_apart_from_s_per_epoch():
    cached = {**stage("fixed"), "feature_cache_s": 12.345}
    table = stage_table([stage("pretrain"), cached]).splitlines()
    assert "| s/epoch | features s (once) | trainable params |" in table[0]
    assert table[1].count("|") == table[0].count("|")
    assert table[2] == "| pretrain | 10 | 0.8000 | 0.8000 | 1.00 | — | 1,234 |"
    assert table[3] == "| fixed | 10 | 0.8000 | 0.8000 | 1.00 | 12.35 | 1,234 |"
    assert "features" not in stage_table([stage("a")])


def test_mtl_eval_scores_the_carved_validation_set(tested_run, capsys):
    _, summary = tested_run
    assert main(["eval", summary["run_dir"], "--split", "val"]) == 0
    metrics = json.loads(open(f"{summary['run_dir']}/eval/val/metrics.json").read())
    assert metrics["size"] == 12 and metrics["data_split"] == 0.25
    assert metrics["acc"] == pytest.approx(summary["best"]["val"]["acc"])
    assert main(["eval", summary["run_dir"], "--split", "test"]) == 0  # test_split: the folder's val/
    tested = json.loads(open(f"{summary['run_dir']}/eval/test/metrics.json").read())
    assert tested["size"] == 24 and tested["data_split"] == "val"
    assert tested["acc"] == pytest.approx(summary["test"]["best"]["acc"])


class NoBestEpoch(Hook):
    """A score that is never a number: no epoch is the best and no best.pt is written."""

    def before_train(self, trainer):
        trainer.monitor = lambda metrics: float("nan")


def test_without_a_best_epoch_only_the_final_weights_are_tested(color_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(HOOKS._entries, "no_best_epoch", NoBestEpoch)
    raw = tiny_config(color_folder, tmp_path / "runs", **{"data.test_split": "val", "data.val_split": 0.25})
    raw["train"].update(epochs=1, hooks=["no_best_epoch"])
    summary = run(build_config(raw), quiet=True)
    assert summary["best"]["epoch"] is None and summary["test"]["best"] is None
    assert summary["test"]["last"]["tasks"]["label"]["acc"] >= 0


def test_under_torchrun_the_test_split_is_scored_as_by_one_process(tmp_path):
    """Two processes (gloo) each score their share of the test split; the summed metrics are those of best.pt."""
    raw = tiny_config(make_folder(tmp_path / "colors"), tmp_path / "runs", **{"train.epochs": 2})
    raw["data"].update(val_split=0.25, test_split="val", pipeline="items")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = subprocess.run([*cmd, "-m", "mtl", "train", str(path)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2
    model = open_run(run_dir).model.eval()
    loss, acc, n = scored_by_hand(build_config(raw), model, "val")
    assert summary["test"]["best"]["loss"] == pytest.approx(loss, rel=1e-4)
    assert abs(summary["test"]["best"]["acc"] - acc) <= 1 / n + 1e-9
