"""Continual learning: metrics on hand-made accuracy matrices, class subsets, and the task-sequence runner
on tiny rendered characters with every method."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mtl.cli import main
from mtl.config.load import build_config, load_config
from mtl.config.stages import stage_configs
from mtl.core.errors import UserError
from mtl.data import ClassSubset
from mtl.data.tensor_dataset import TensorImageDataset
from mtl.plugins import Hook
from mtl.workflows.continual import continual_metrics, results_table
from mtl.workflows.stages import train_from_file

CONFIGS = Path(__file__).parents[2] / "configs"


def test_metrics_from_a_hand_made_matrix():
    """ACC, BWT, FWT (GEM eqs. 1-3), forgetting (RWalk) and the progressive-nets transfer, computed by hand."""
    R = [[0.9], [0.95, 0.8], [0.6, 0.7, 0.9]]
    before, random_init = [0.1, 0.4, 0.3], [0.1, 0.25, 0.5]  # R[i-1][i] (before[0] unused) and b_i
    m = continual_metrics(R, single=[0.9, 0.5, 1.0], before=before, random_init=random_init)
    assert m["acc"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)  # -0.2
    assert m["fwt_gem"] == pytest.approx(((0.4 - 0.25) + (0.3 - 0.5)) / 2)  # -0.025
    assert m["forgetting"] == pytest.approx(((0.95 - 0.6) + (0.8 - 0.7)) / 2)  # the peak, not R[j][j]: 0.225
    assert m["transfer_pnn_per_task"] == pytest.approx([0.0, 60.0, -10.0])
    assert m["transfer_pnn"] == pytest.approx(25.0)
    plain = continual_metrics(R)
    assert "transfer_pnn" not in plain and "fwt_gem" not in plain and plain["forgetting"] == m["forgetting"]
    cost = {"time_s": [1.2, 30.6, 4.0], "memory": [{"peak_mib": 3.4}, {"peak_mib": 120.0}, None]}
    table = results_table(["a", "b", "c"], {"x": {**m, **cost, "R": R, "params_per_task": [10, 2000, 3000]}})
    table = table.splitlines()
    assert table[0] == (
        "| method | a acc | b acc | c acc | ACC | BWT | FWT (GEM) | forgetting | transfer PNN % | params per task "
        "| train s per task | peak MiB per task |"
    )
    assert table[2] == (
        "| x | 0.6000 | 0.7000 | 0.9000 | 0.7333 | -0.2000 | -0.0250 | +0.2250 | +25.00 | 10 / 2,000 / 3,000 "
        "| 1 / 31 / 4 | 3 / 120 / n/a |"
    )
    table = results_table(["a", "b", "c"], {"y": {**plain, "R": R, "params_per_task": [1, 1, 1]}}).splitlines()
    assert (
        table[2] == "| y | 0.6000 | 0.7000 | 0.9000 | 0.7333 | -0.2000 | n/a | +0.2250 | n/a | 1 / 1 / 1 | n/a | n/a |"
    )


def test_forgetting_and_fwt_match_a_brute_force_count_on_random_matrices():
    """Each task's forgetting is its best accuracy before the end minus its final one (RWalk's f_j), found here by
    scanning a full T x T matrix; FWT sums the superdiagonal minus b."""
    rng = np.random.default_rng(0)
    for T in (2, 3, 5):
        full = rng.uniform(size=(T, T))
        b = rng.uniform(size=T)
        R = [list(full[i, : i + 1]) for i in range(T)]
        before = [0.0] + [full[i - 1, i] for i in range(1, T)]
        m = continual_metrics(R, before=before, random_init=list(b))
        peaks = [np.max(np.where(np.arange(T - 1) >= j, full[: T - 1, j], -np.inf)) for j in range(T - 1)]
        assert m["forgetting"] == pytest.approx(np.mean(np.array(peaks) - full[T - 1, : T - 1]))
        assert m["fwt_gem"] == pytest.approx(np.mean(np.diagonal(full, offset=1) - b[1:]))
        assert m["bwt"] == pytest.approx(np.mean(full[T - 1, : T - 1] - np.diagonal(full)[: T - 1]))
        assert m["acc"] == pytest.approx(full[T - 1].mean())


def tensor_dataset(labels, classes=("a", "b", "c", "d")):
    images = torch.arange(len(labels), dtype=torch.uint8)[:, None, None, None].expand(-1, 3, 2, 2).contiguous()
    return TensorImageDataset(images, torch.tensor(labels), list(classes), transform=None)


def test_class_subset_keeps_and_relabels_the_chosen_classes():
    ds = tensor_dataset([0, 1, 2, 3, 2, 1, 3])
    sub = ClassSubset(ds, ["d", 1])
    assert sub.classes == ["d", "b"] and len(sub) == 4
    assert [int(sub[i]["label"]) for i in range(4)] == [1, 0, 1, 0]  # items 1, 3, 5, 6 of the parent
    assert sub.labels.tolist() == [1, 0, 1, 0]
    assert torch.equal(sub[1]["image"], ds[3]["image"])
    for bad, message in [(["z"], "no class 'z'"), ([4], "out of range"), ([1, 1], "distinct"), ([], "distinct")]:
        with pytest.raises(UserError, match=message):
            ClassSubset(ds, bad)


def tiny(tmp_path, *overrides):
    return [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'chars'}",
        "data.options={per_class: 6, val_per_class: 6, size: 16, seed: 0}",
        "data.image_size=16",
        "data.resize_size=16",
        "data.batch_size=8",
        "model.encoder_options.widths=[8,8,16,16]",
        "train.epochs=2",
        "train.progress=false",
        *overrides,
    ]


@pytest.fixture(scope="module")
def progressive_run(tmp_path_factory):
    pytest.importorskip("captcha")
    tmp_path = tmp_path_factory.mktemp("progressive")
    (summary,) = train_from_file(str(CONFIGS / "progressive.yaml"), tiny(tmp_path, "train.progress=false"))
    return tmp_path, summary


def test_progressive_config_runs_every_method(progressive_run):
    tmp_path, summary = progressive_run
    names = ["letters_a_j", "letters_k_t", "digits"]
    assert summary["tasks"] == names
    methods = summary["methods"]
    assert list(methods) == ["progressive", "independent", "finetune", "head_only"]
    for m, r in methods.items():
        assert [len(row) for row in r["R"]] == [1, 2, 3], m
        assert all(0 <= a <= 1 for row in r["R"] for a in row)
        assert r["acc"] == pytest.approx(sum(r["R"][-1]) / 3)
    # progressive and independent columns never change once trained: no forgetting, exactly
    assert methods["progressive"]["bwt"] == 0.0 and methods["independent"]["bwt"] == 0.0
    assert methods["independent"]["transfer_pnn"] == 0.0
    assert methods["independent"]["transfer_pnn_per_task"] == [0.0, 0.0, 0.0]
    assert methods["progressive"]["forgetting"] == 0.0 and methods["independent"]["forgetting"] == 0.0
    # a new independent column before training is the freshly initialised one (same seed): GEM's FWT is 0, exactly
    assert methods["independent"]["acc_before"] == methods["independent"]["acc_random_init"]
    assert methods["independent"]["fwt_gem"] == 0.0
    for m, r in methods.items():
        assert r["acc_before"][0] == r["acc_random_init"][0], m  # nothing trained before the first task
        assert len(r["acc_random_init"]) == 3 and all(0 <= a <= 1 for a in r["acc_before"] + r["acc_random_init"])
        b, before = r["acc_random_init"], r["acc_before"]
        assert r["fwt_gem"] == pytest.approx((before[1] - b[1] + before[2] - b[2]) / 2)
        R = r["R"]
        peaks = [max(R[0][0], R[1][0]), R[1][1]]
        assert r["forgetting"] == pytest.approx((peaks[0] - R[2][0] + peaks[1] - R[2][1]) / 2)
    # the first column sees no laterals: it is the independent column, same seed, same result
    assert methods["progressive"]["R"][0][0] == methods["independent"]["R"][0][0]
    p = methods["progressive"]["params_per_task"]
    assert p[0] == methods["independent"]["params_per_task"][0] and p[1] > p[0] and p[2] > p[1]  # laterals grow
    assert methods["head_only"]["params_per_task"][1] < p[0]  # a head only
    root = Path(summary["run_dir"])
    saved = json.loads((root / "summary.json").read_text())
    assert saved["methods"]["progressive"]["R"] == methods["progressive"]["R"]
    assert (root / "results.md").read_text().startswith("| method | letters_a_j acc")
    assert "| ACC | BWT | FWT (GEM) | forgetting | transfer PNN % |" in (root / "results.md").read_text()
    for m in methods:
        for name in names:
            assert (root / m / name / "checkpoints" / "best.pt").is_file()
    assert (
        "| progressive |" in (root / "results.md").read_text() and "R for finetune" in (root / "results.md").read_text()
    )
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    acc = EventAccumulator(str(root))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in [
        "R/progressive/letters_a_j",
        "average_acc/finetune",
        "continual/bwt/finetune",
        "continual/fwt_gem/progressive",
        "continual/forgetting/head_only",
        "continual/transfer_pnn/progressive",
    ]:
        assert tag in tags, tag
    assert len(acc.Scalars("R/progressive/letters_a_j")) == 3  # after each of the 3 tasks
    for m in methods:  # the accuracy matrix as a heatmap, in plots/ and as a TensorBoard image
        with Image.open(root / "plots" / f"accuracy_{m}.png") as image:
            assert image.format == "PNG"
        assert f"continual/accuracy/{m}" in acc.Tags()["images"]
    for m in methods:  # one hparams session per method, in its own folder, with its metrics
        session = EventAccumulator(str(root / m))
        session.Reload()
        assert "_hparams_/session_start_info" in session.summary_metadata, m
        content = session.PluginTagToContent("hparams")["_hparams_/session_start_info"]
        assert HParamsPluginData.FromString(content).session_start_info.hparams["method"].string_value == m
        for key in ("acc", "bwt", "fwt_gem", "forgetting"):
            (event,) = session.Scalars(f"continual/{key}")
            assert event.value == pytest.approx(methods[m][key], abs=1e-6), (m, key)
    assert ("continual/transfer_pnn" in session.Tags()["scalars"]) == ("transfer_pnn" in methods[m])


def test_every_task_run_of_every_method_evaluates_and_summarises(progressive_run, capsys):
    from test_inspection import totals

    from mtl.workflows.evaluate import eval_command
    from mtl.workflows.inspect import summary_command
    from mtl.workflows.runs import load_model

    tmp_path, summary = progressive_run
    root = Path(summary["run_dir"])
    for method, result in summary["methods"].items():
        for k, name in enumerate(summary["tasks"]):
            eval_command(str(root / method / name), "val")
            metrics = json.loads((root / method / name / "eval" / "val" / "metrics.json").read_text())
            assert metrics["tasks"][name]["acc"] == pytest.approx(result["R"][k][k], abs=1e-6), (method, name)
    loaded = load_model(root / "progressive" / "digits")
    net = loaded.model.net
    assert net.tasks == summary["tasks"] and list(loaded.tasks) == ["digits"]
    # the config, the run's root and the last task's run show the same three-column network
    counts = [net.column_parameters(t)["total"] for t in net.tasks]
    expected = (sum(counts), counts[-1], sum(counts[:-1]))
    config_table = summary_command(str(CONFIGS / "progressive.yaml"), tiny(tmp_path), None, None)
    assert totals(config_table) == expected
    assert totals(summary_command(str(root), [], None, None)) == expected
    assert totals(summary_command(str(root / "progressive" / "digits"), [], None, None)) == expected
    assert main(["predict", str(root), str(tmp_path)]) == 2
    assert "<method>/<task>" in capsys.readouterr().err


def test_an_interrupted_continual_run_resumes_as_a_whole(tmp_path, capsys):
    """Task runs with summary.json are reused (weights and R row), the one with only last.pt resumes, later ones
    train; the metrics come out as uninterrupted. The root is locked while it trains; a complete one says so."""
    pytest.importorskip("captcha")
    from test_train import _held

    overrides = tiny(tmp_path, "train.epochs=1", "continual.methods=[independent, finetune]")
    (first,) = train_from_file(str(CONFIGS / "progressive.yaml"), overrides)
    root = Path(first["run_dir"])
    assert (root / ".lock").is_file()
    for gone in ("summary.json", "results.md", "finetune/letters_k_t/summary.json"):
        (root / gone).unlink()
    shutil.rmtree(root / "finetune" / "digits")
    capsys.readouterr()

    with _held(root):
        assert main(["train", "--resume", str(root / "finetune" / "letters_k_t")]) == 2
    assert "is in use" in capsys.readouterr().err and not (root / "finetune" / "digits").exists()

    assert main(["train", "--resume", str(root / "finetune" / "letters_k_t")]) == 0
    out = capsys.readouterr().out
    assert f"is part of the run {root}" in out
    assert "finetune: task 1/3 letters_a_j (done: reused)" in out and "finetune: task 2/3 letters_k_t ===" in out
    again = json.loads((root / "summary.json").read_text())
    for m, r in first["methods"].items():
        for key in ("R", "acc_before", "acc_random_init", "acc", "bwt", "fwt_gem", "forgetting", "transfer_pnn"):
            assert flat(again["methods"][m][key]) == pytest.approx(flat(r[key]), abs=1e-6), (m, key)
    assert (root / "finetune" / "digits" / "summary.json").is_file()
    assert "| finetune |" in (root / "results.md").read_text()

    assert main(["train", "--resume", str(root)]) == 0
    assert capsys.readouterr().out.strip() == (
        f"{root} is complete: every method and task has its summary.json; nothing to resume"
    )


def test_a_continual_run_reports_the_test_split_and_selects_on_validation(tmp_path):
    """With data.test_split every accuracy is also measured on it: R_test, its metrics, a results table of its own
    (first), the heatmaps of it; each task's best epoch is still picked on data.val_split."""
    pytest.importorskip("captcha")
    (summary,) = train_from_file(
        str(CONFIGS / "progressive.yaml"),
        tiny(
            tmp_path,
            "continual.methods=[independent,finetune]",
            "data.val_split=0.25",
            "data.test_split=val",
            "train.epochs=1",
            "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3]}}]",
        ),
    )
    r = summary["methods"]["finetune"]
    assert r["splits"] == ["val", "test"]
    assert [len(row) for row in r["R_test"]] == [1, 2]
    assert r["test"]["acc"] == pytest.approx(sum(r["R_test"][-1]) / 2)
    assert r["test"]["bwt"] == pytest.approx(r["R_test"][1][0] - r["R_test"][0][0])
    assert summary["methods"]["independent"]["test"]["bwt"] == 0.0
    assert "transfer_pnn" in r["test"] and len(r["acc_before_test"]) == 2 and len(r["acc_random_init_test"]) == 2
    text = (Path(summary["run_dir"]) / "results.md").read_text()
    assert text.index("On data.test_split") < text.index("On data.val_split")
    assert "R for finetune on test" in text and "train s per task" in text
    task_summary = json.loads((Path(summary["run_dir"]) / "finetune" / "b" / "summary.json").read_text())
    assert task_summary["R_test_row"] == r["R_test"][1] and task_summary["memory"]["peak_mib"] >= 0


def flat(value):
    """A number, a list or a list of rows (R) as one flat list."""
    return list(np.hstack(value)) if isinstance(value, list) else [value]


def test_split_fashion_mnist_config_makes_five_two_class_tasks(tmp_path):
    raw, sources = load_config(CONFIGS / "progressive_split_fmnist.yaml")
    configs = stage_configs(raw, sources)
    assert [c.data.classes for c in configs] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    assert build_config(raw, sources).continual.methods == ["progressive", "independent", "finetune", "head_only"]


def test_split_fashion_mnist_runs_on_idx_files(tmp_path):
    from test_data_multitask import write_idx

    root, rng = tmp_path / "fm", np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", 40), ("t10k", 20)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) % 10)
    (summary,) = train_from_file(
        str(CONFIGS / "progressive_split_fmnist.yaml"),
        [
            f"out_dir={tmp_path / 'runs'}",
            f"data.root={root}",
            "train.epochs=1",
            "train.progress=false",
            "continual.methods=[progressive,finetune]",
            "model.encoder_options.widths=[8,8,8]",
        ],
    )
    assert len(summary["methods"]["progressive"]["R"]) == 5 and summary["methods"]["progressive"]["bwt"] == 0.0
    assert "transfer_pnn" not in summary["methods"]["progressive"]  # no independent reference
    assert "fwt_gem" in summary["methods"]["progressive"]  # b_i needs none


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["continual.methods=[progressive, finetuned]"], "unknown continual method 'finetuned'. Did you mean finetune"),
        (["continual.scenario=class"], "'progressive' cannot run continual.scenario: class"),
        (["continual.scenario=sideways"], "continual.scenario must be one of task, class, domain"),
        (["continual.options={progressive: {alpha: 1}}"], "unknown option.s. alpha for method 'progressive'"),
        (["continual.methods=[progressive]", "continual.options={finetune: {}}"], "'finetune' is not in continual"),
        (["stages=[{name: a}]"], "two or more stages"),
        (["stages=[{name: a}, {name: b, tasks: {label: {}, other: {}}}]"], "one task"),
        (["stages=[{name: a}, {name: b, model: {encoder_options: {widths: [8, 8, 8]}}}]"], "one encoder architecture"),
        (["stages=[{name: a}, {name: b, tasks: {label: {head: fpn}}}]"], "pooled head"),
        (["stages=[{name: a}, {name: b, model: {weights: 'stage:a'}}]"], "continual methods build their own"),
        (["train.monitor=label.f1"], "not a task metric"),
        (["train.monitor=delta_m"], "continual tasks have no delta_m"),
    ],
)
def test_bad_continual_configs(tmp_path, overrides, message):
    pytest.importorskip("captcha")
    with pytest.raises(UserError, match=message):
        train_from_file(str(CONFIGS / "progressive.yaml"), tiny(tmp_path, *overrides))


def test_cli_bad_continual_config_exits_2(tmp_path, capsys):
    code = main(["train", str(CONFIGS / "progressive.yaml"), *tiny(tmp_path, "continual.methods=[lwf_x]")])
    assert code == 2
    assert "unknown continual method 'lwf_x'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


class RecordOptions(Hook):
    """Records the trainer's channels_last, nonfinite and its monitor's score of a hand-made phase."""

    seen: list = []

    def after_train(self, trainer):
        (task,) = trainer.tasks
        score = trainer.options.monitor({"loss": 9.0, "tasks": {task: {"acc": 0.25}}})
        RecordOptions.seen.append((trainer.channels_last, trainer.options.nonfinite, score))


def test_hooks_named_in_the_config_run_for_every_method_and_task(tmp_path, monkeypatch):
    """After mtl's own hooks, as in a single run; an unknown one is refused before anything is written."""
    pytest.importorskip("captcha")
    from test_train import RecordEpochs

    from mtl.plugins import HOOKS

    monkeypatch.setitem(HOOKS._entries, "record_epochs", RecordEpochs)
    monkeypatch.setattr(RecordEpochs, "seen", [])
    with pytest.raises(UserError, match="unknown hook 'record_epoch'"):
        train_from_file(str(CONFIGS / "progressive.yaml"), tiny(tmp_path, "train.hooks=[record_epoch]"))
    assert not (tmp_path / "runs").exists()
    monkeypatch.setitem(HOOKS._entries, "record_options", RecordOptions)
    monkeypatch.setattr(RecordOptions, "seen", [])
    train_from_file(
        str(CONFIGS / "progressive.yaml"),
        tiny(
            tmp_path,
            "train.epochs=1",
            "train.hooks=[record_epochs, record_options]",
            "continual.methods=[finetune, head_only]",
            "train.channels_last=off",
            "train.nonfinite=skip",
            "train.monitor=loss",
        ),
    )
    own = ["MetricsFileHook", "TensorBoardHook", "CheckpointHook", "ConsoleHook", "ChanceWarningHook"]
    hooks = own + ["RecordEpochs", "RecordOptions"]
    assert RecordEpochs.seen == [("x", 1, hooks)] * 6  # 2 methods x 3 tasks
    names = ["letters_a_j", "letters_k_t", "digits"] * 2
    assert RecordOptions.seen == [(False, "skip", -9.0) for _ in names]


def test_a_monitor_naming_the_configs_task_follows_it_to_the_stage_name():
    from mtl.workflows.continual import as_sequence_stage

    raw, sources = load_config(CONFIGS / "progressive.yaml", ["train.monitor=label.acc"])
    cfg = as_sequence_stage(stage_configs(raw, sources)[1])
    assert list(cfg.tasks) == ["letters_k_t"] and cfg.train.monitor == "letters_k_t.acc"


def test_new_columns_start_from_pretrained_weights(tmp_path):
    """``model.weights`` set: every new column starts from that file (the laterals and head stay random)."""
    pytest.importorskip("captcha")
    from mtl.models.encoders import build_encoder
    from mtl.workflows.continual import build_learner, prepare_sequence

    torch.manual_seed(5)
    saved = build_encoder("small_cnn", widths=[8, 8, 16, 16]).state_dict()
    torch.save(saved, tmp_path / "enc.pt")
    raw, sources = load_config(CONFIGS / "progressive.yaml")
    for override in tiny(tmp_path, f"model.weights={tmp_path / 'enc.pt'}"):
        key, value = override.split("=", 1)
        node = raw
        *path, last = key.split(".")
        for part in path:
            node = node.setdefault(part, {})
        node[last] = yaml.safe_load(value)
    sequence = prepare_sequence(stage_configs(raw, sources)[:2], torch.device("cpu"))
    learner = build_learner("progressive", build_config(raw, sources), torch.device("cpu"))
    for k, st in enumerate(sequence):
        learner.train_model(k, st)
        column = learner.net.columns[k]
        values = torch.cat([p.detach().flatten() for p in column.stages.parameters()]).sort().values
        expected = torch.cat([v.flatten() for name, v in saved.items() if name.endswith(("weight", "bias"))])
        assert torch.equal(values, expected.sort().values)  # the same numbers, whatever the module names


def test_each_task_is_seeded_with_the_runs_seed_plus_its_index(tmp_path):
    """Task k trains with train.seed + k (in its config.yaml): two identical tasks do not give two identical
    columns, as one seed for every task would (same initial weights, same data order), which the transfer scores
    would count as transfer."""
    pytest.importorskip("captcha")
    same = "{options: {charset: ABC}}"
    overrides = tiny(
        tmp_path,
        "train.epochs=1",
        "train.seed=7",
        "continual.methods=[independent]",
        f"stages=[{{name: first, data: {same}}}, {{name: again, data: {same}}}]",
    )
    (summary,) = train_from_file(str(CONFIGS / "progressive.yaml"), overrides)
    root = Path(summary["run_dir"])
    runs = [root / "independent" / name for name in ("first", "again")]
    assert [yaml.safe_load((r / "config.yaml").read_text())["train"]["seed"] for r in runs] == [7, 8]
    weights = [torch.load(r / "checkpoints" / "last.pt", weights_only=True)["model"] for r in runs]
    first = {k[len("net.columns.0.") :]: v for k, v in weights[0].items() if k.startswith("net.columns.0.")}
    again = {k[len("net.columns.1.") :]: v for k, v in weights[1].items() if k.startswith("net.columns.1.")}
    assert first.keys() == again.keys() and first
    assert any(not torch.equal(first[k], again[k]) for k in first if first[k].is_floating_point())
