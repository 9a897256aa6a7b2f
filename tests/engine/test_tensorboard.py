"""TensorBoard that compares runs: the same hparam keys and metric columns for every run, every scalar at x = the
epoch, task weights as their epoch mean, and dense predictions beside their ground truth. Read back from the event
files with TensorBoard's own reader."""

import io
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config
from PIL import Image
from test_multitask import scenes_config

from mtl.build.training import _hparams, run_hparams
from mtl.cli import main
from mtl.config.load import build_config, config_to_dict
from mtl.engine.hooks import HOOKS, Hook, hparam_metrics
from mtl.tasks.drawing import TILE
from mtl.workflows.train import run

pytestmark = pytest.mark.usefixtures("one_thread")


def events(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"images": 0, "scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def hparams_of(acc):
    """(the run's hparams, the metric names its experiment summary lists)."""
    from tensorboard.plugins.hparams import metadata

    content = acc.PluginTagToContent("hparams")
    start = metadata.parse_session_start_info_plugin_data(content[metadata.SESSION_START_INFO_TAG])
    experiment = metadata.parse_experiment_plugin_data(content[metadata.EXPERIMENT_TAG])
    values = {k: (v.string_value if v.HasField("string_value") else v.number_value) for k, v in start.hparams.items()}
    return values, [m.name.tag for m in experiment.metric_infos]


def last(acc, tag):
    return acc.Scalars(tag)[-1].value


class RecordWeights(Hook):
    """The weighting's task weights after every training step, per epoch."""

    seen: list = []

    def before_epoch(self, trainer):
        RecordWeights.seen.append([])

    def after_step(self, trainer, losses):
        RecordWeights.seen[-1].append(trainer.weighting.last_weights.detach().clone())


def test_every_scalar_is_at_the_epoch_and_task_weights_are_the_epoch_mean(tmp_path, monkeypatch):
    monkeypatch.setitem(HOOKS._entries, "record_weights", RecordWeights)
    monkeypatch.setattr(RecordWeights, "seen", [])
    cfg = scenes_config(tmp_path, "weighting.name=rlw", "train.hooks=[record_weights]", n=16, size=16)
    summary = run(cfg, quiet=True)
    acc = events(summary["run_dir"])
    scalars = acc.Tags()["scalars"]
    per_epoch = [t for t in scalars if not t.startswith(("hparam/", "test/"))]
    assert {"weight/seg", "weight/label", "loss/train", "seg/miou/val", "lr/group0"} <= set(per_epoch)
    for tag in per_epoch:
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    once = [t for t in scalars if t.startswith("test/")]  # the test split, scored once: at the last epoch
    assert "test/best/seg/miou" in once
    for tag in once:
        assert [e.step for e in acc.Scalars(tag)] == [2], tag
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert [len(steps) for steps in RecordWeights.seen] == [summary["steps_per_epoch"]] * 2
    for epoch, steps in enumerate(RecordWeights.seen):
        mean = torch.stack(steps).double().mean(0)  # RLW draws new weights every step: the mean differs from each
        assert not torch.allclose(mean.float(), steps[-1])
        for i, task in enumerate(["seg", "depth", "normal", "label"]):
            assert lines[epoch]["weights"][task] == pytest.approx(float(mean[i]), rel=1e-5)
            assert acc.Scalars(f"weight/{task}")[epoch].value == pytest.approx(float(mean[i]), rel=1e-5)


def test_dense_tasks_show_input_truth_and_prediction_in_readable_tiles(tmp_path):
    """configs/mtl_scenes.yaml logs 4 validation scenes per dense task: one row each, three tiles of at least
    TILE pixels, and a key on the right."""
    summary = run(scenes_config(tmp_path, "train.epochs=1", n=16, size=16), quiet=True)
    acc = events(summary["run_dir"])
    for task in ("seg", "depth", "normal"):
        (event,) = acc.Images(f"val/overlay_{task}")
        picture = Image.open(io.BytesIO(event.encoded_image_string))
        assert picture.height >= 4 * TILE and picture.width > 3 * TILE + 40, (task, picture.size)
        assert event.step == 1


def test_weighting_log_every_is_ignored_with_a_one_line_warning(tmp_path):
    with pytest.warns(UserWarning, match=r"weighting.log_every is ignored: task weights are logged once per epoch"):
        scenes_config(tmp_path, "weighting.log_every=5")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scenes_config(tmp_path)  # not set: no warning


def test_mtl_train_with_weighting_log_every_warns_in_one_line_and_trains(color_folder, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1})))
    assert main(["train", str(cfg), "weighting.log_every=5", "train.log_images=0"]) == 0
    err = [line for line in capsys.readouterr().err.splitlines() if "log_every" in line]
    assert err == [
        "mtl: warning: weighting.log_every is ignored: task weights are logged once per epoch (their mean over "
        "the epoch's steps, at x = epoch like every scalar); remove the key"
    ]


def test_single_and_multitask_runs_have_the_same_hparam_keys_and_per_task_metric_columns(color_folder, tmp_path):
    single = run(build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2})), quiet=True)
    multi = run(scenes_config(tmp_path, "weighting.name=pcgrad", n=16, size=16), quiet=True)
    (hp_single, names_single), (hp_multi, names_multi) = (hparams_of(events(s["run_dir"])) for s in (single, multi))
    assert list(hp_single) == list(hp_multi) and set(hp_single) >= {
        "seed",
        "weighting",
        "freeze",
        "lr",
        "optimizer",
        "encoder",
        "tasks",
        "epochs",
        "batch_size",
        "data",
        "arch",
    }
    assert hp_single["weighting"] == "-" and hp_single["grad_on"] == "-" and hp_single["tasks"] == "label"
    assert hp_multi["weighting"] == "pcgrad" and hp_multi["grad_on"] == "params"
    assert hp_multi["tasks"] == "seg,depth,normal,label" and hp_multi["lr"] == pytest.approx(0.001)
    assert all(type(hp_single[k]) is type(hp_multi[k]) for k in hp_single)  # one type per column
    assert "hparam/best_score" not in names_single + names_multi
    for s, names in ((single, names_single), (multi, names_multi)):
        acc = events(s["run_dir"])
        assert last(acc, "hparam/best_epoch") == s["best"]["epoch"]
        for kind in ("best", "final"):
            assert f"hparam/{kind}/loss" in names and f"hparam/{kind}/delta_m" in names  # listed, no baseline: no value
            assert f"hparam/{kind}/delta_m" not in acc.Tags()["scalars"]
            assert last(acc, f"hparam/{kind}/loss") == pytest.approx(s[kind]["val"]["loss"], rel=1e-6)
            for task, metrics in s[kind]["val"]["tasks"].items():
                for metric, value in metrics.items():
                    assert f"hparam/{kind}/{task}.{metric}" in names
                    assert last(acc, f"hparam/{kind}/{task}.{metric}") == pytest.approx(value, rel=1e-6)
    assert "hparam/best/seg.miou" in names_multi and "hparam/final/depth.abs_err" in names_multi
    assert "hparam/best/acc" in names_single and "hparam/best/acc" not in names_multi  # not every task has one
    # a second run of the same tasks lists exactly the same columns, whatever its values
    again = run(scenes_config(tmp_path, "weighting.name=mgda", "optim.lr=0.01", n=16, size=16), quiet=True)
    assert hparams_of(events(again["run_dir"]))[1] == names_multi


def test_per_task_metrics_under_their_own_names_in_both_phases(color_folder, tmp_path):
    """A single-task run logs its task's metrics as a multitask run does (``label/acc/val``), so runs compare in one
    chart, and the train and val phases log the same names."""
    summary = run(build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1})), quiet=True)
    scalars = events(summary["run_dir"]).Tags()["scalars"]
    for phase in ("train", "val"):
        assert {f"label/acc/{phase}", f"label/loss/{phase}", f"loss/{phase}", f"acc/{phase}"} <= set(scalars)
    train = {t.rsplit("/", 1)[0] for t in scalars if t.endswith("/train")}
    val = {t.rsplit("/", 1)[0] for t in scalars if t.endswith("/val")}
    assert train == val


def test_hparam_metric_names_depend_on_the_tasks_only():
    """Hand-made history: values come from the best and the last epoch, names never depend on what was measured."""

    class Fake:
        metric_directions = {"loss": False, "miou": True, "pixel_acc": True}

    history = [
        {"val": {"loss": 2.0, "tasks": {"seg": {"loss": 2.0, "miou": 0.5, "pixel_acc": 0.7}}}},
        {"val": {"loss": 3.0, "tasks": {"seg": {"loss": 3.0, "miou": 0.4, "pixel_acc": 0.6}}, "delta_m": -1.5}},
    ]
    names, values = hparam_metrics({"seg": Fake()}, history, 1, True)
    assert names == [
        "hparam/best_epoch",
        "hparam/best/loss",
        "hparam/best/delta_m",
        "hparam/best/seg.loss",
        "hparam/best/seg.miou",
        "hparam/best/seg.pixel_acc",
        "hparam/final/loss",
        "hparam/final/delta_m",
        "hparam/final/seg.loss",
        "hparam/final/seg.miou",
        "hparam/final/seg.pixel_acc",
    ]
    assert values == {
        "hparam/best_epoch": 1.0,
        "hparam/best/loss": 2.0,
        "hparam/best/seg.loss": 2.0,
        "hparam/best/seg.miou": 0.5,
        "hparam/best/seg.pixel_acc": 0.7,
        "hparam/final/loss": 3.0,
        "hparam/final/delta_m": -1.5,
        "hparam/final/seg.loss": 3.0,
        "hparam/final/seg.miou": 0.4,
        "hparam/final/seg.pixel_acc": 0.6,
    }
    names_train, _ = hparam_metrics({"seg": Fake()}, [{"train": history[0]["val"]}], 1, False)
    assert names_train[1] == "hparam/best_train/loss"


def test_run_hparams_of_a_continual_learner_keep_the_keys(tmp_path):
    cfg = scenes_config(tmp_path)
    hp = _hparams(cfg, {"method": "finetune"})
    assert list(hp) == list(run_hparams(cfg)) and hp["method"] == "finetune"
    with pytest.raises(ValueError, match="task"):
        _hparams(cfg, {"task": "seg"})


def test_an_unset_deprecated_key_is_not_written_to_config_yaml(tmp_path):
    assert "log_every" not in config_to_dict(build_config({}))["weighting"]
    with pytest.warns(UserWarning, match="log_every is ignored"):
        assert config_to_dict(build_config({"weighting": {"log_every": 5}}))["weighting"]["log_every"] == 5
