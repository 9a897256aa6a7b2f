"""End to end: a short run writes every artifact, learns, resumes exactly, and the CLI fails cleanly."""

import json
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from conftest import tiny_config

from mtl.cli import main
from mtl.config.load import build_config
from mtl.core.checkpoint import load_checkpoint
from mtl.plugins import HOOKS, Hook
from mtl.workflows.train import resume_run, run


def test_short_run_writes_artifacts_and_learns(color_folder, tmp_path):
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs"))
    summary = run(cfg, quiet=True)
    run_dir = tmp_path / "runs" / "tiny"
    (d,) = list(run_dir.iterdir())
    assert summary["run_dir"] == str(d)
    for name in ["config.yaml", "metrics.jsonl", "summary.json", "checkpoints/best.pt", "checkpoints/last.pt"]:
        assert (d / name).is_file(), name
    assert list(d.glob("events.out.tfevents.*")), "no TensorBoard events"
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [1, 2, 3]
    saved = json.loads((d / "summary.json").read_text())
    assert saved["best"]["val"]["acc"] > 0.6  # 3 classes: chance is 1/3
    assert saved["train_size"] == 48 and saved["val_size"] == 24 and saved["classes"] == ["blue", "green", "red"]
    assert saved["time"]["mean_epoch_s"] > 0 and len(saved["time"]["epoch_s"]) == 3
    assert saved["memory"]["peak_mib"] >= 0 and "resident memory" in saved["memory"]["measure"]  # CPU: RSS growth
    best = load_checkpoint(d / "checkpoints" / "best.pt")
    assert best["epoch"] == saved["best"]["epoch"] and best["classes"] == {"label": ["blue", "green", "red"]}


def test_tensorboard_has_scalars_lr_images_and_hparams_in_run_dir(color_folder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2})), quiet=True)
    acc = EventAccumulator(summary["run_dir"], size_guidance={"images": 0})
    acc.Reload()
    tags = acc.Tags()
    for tag in ["loss/train", "loss/val", "acc/train", "acc/val", "lr/group0", "hparam/best/label.acc"]:
        assert tag in tags["scalars"], tag
    assert len(acc.Scalars("loss/val")) == 2
    assert "val/predictions" in tags["images"]
    assert "_hparams_/session_start_info" in acc.summary_metadata or any("hparams" in t for t in tags["tensors"])
    import os

    assert [p for p in os.listdir(summary["run_dir"]) if os.path.isdir(os.path.join(summary["run_dir"], p))] == [
        "checkpoints"
    ]


def test_best_checkpoint_is_restored_at_the_end(color_folder, tmp_path):

    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 3}))
    summary = run(cfg, quiet=True)
    best = load_checkpoint(f"{summary['run_dir']}/checkpoints/best.pt")["model"]
    last = load_checkpoint(f"{summary['run_dir']}/checkpoints/last.pt")["model"]
    assert best.keys() == last.keys()
    # the saved config reproduces: training again from run_dir/config.yaml gives the same numbers
    raw = yaml.safe_load(open(f"{summary['run_dir']}/config.yaml"))
    again = run(build_config(raw), quiet=True)
    assert again["best"]["val"]["acc"] == summary["best"]["val"]["acc"]
    assert again["final"]["train"]["loss"] == pytest.approx(summary["final"]["train"]["loss"], rel=1e-5)


def test_resume_equals_uninterrupted_run(color_folder, tmp_path):
    raw = tiny_config(color_folder, tmp_path / "full", **{"train.epochs": 3, "train.deterministic": True})
    raw["tasks"] = {"label": {"head": {"name": "mlp", "hidden": 16, "dropout": 0.3}}}  # dropout uses the RNG
    raw["train"]["unfreeze"] = [{"epoch": 1, "modules": ["stage4"], "lr_mult": 0.5}]
    raw["model"]["freeze"] = "all"
    full = run(build_config(raw), quiet=True)

    raw["out_dir"] = str(tmp_path / "part")
    raw["train"]["epochs"] = 3
    part_cfg = build_config(raw)
    # stop after one epoch, then resume from the run directory
    import mtl.engine.trainer as trainer_mod

    orig_fit = trainer_mod.Trainer.fit

    def fit_one_epoch(self):
        self.epochs_target, self.epochs = self.epochs, 1
        try:
            return orig_fit(self)
        finally:
            self.epochs = self.epochs_target

    trainer_mod.Trainer.fit = fit_one_epoch
    try:
        first = run(part_cfg, quiet=True)
    finally:
        trainer_mod.Trainer.fit = orig_fit
    assert first["epochs"] == 1
    resumed = resume_run(first["run_dir"])
    assert resumed["epochs"] == 3
    a = load_checkpoint(f"{full['run_dir']}/checkpoints/last.pt")
    b = load_checkpoint(f"{resumed['run_dir']}/checkpoints/last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["history"][-1]["train"]["loss"] == b["history"][-1]["train"]["loss"]
    lines = (tmp_path / "part").rglob("metrics.jsonl")
    assert [json.loads(x)["epoch"] for x in next(lines).read_text().splitlines()] == [1, 2, 3]


def test_class_count_mismatch_is_clear(color_folder, tmp_path):
    from mtl.core.errors import UserError

    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"tasks": {"label": {"num_classes": 5}}}))
    with pytest.raises(UserError, match="num_classes is 5 but the data has 3 classes"):
        run(cfg, quiet=True)
    cfg = build_config(tiny_config(color_folder, tmp_path / "runs", **{"tasks": {"label": {"type": "binary"}}}))
    with pytest.raises(UserError, match="binary"):
        run(cfg, quiet=True)


def test_binary_head_trains(tmp_path):
    from conftest import make_folder

    root = make_folder(tmp_path / "two", classes={"cat": (200, 50, 50), "dog": (50, 50, 200)})
    cfg = build_config(tiny_config(root, tmp_path / "runs", **{"tasks": {"label": {"type": "binary"}}}))
    summary = run(cfg, quiet=True)
    assert summary["best"]["val"]["acc"] > 0.7


@pytest.mark.parametrize(
    "args, words",
    [
        (["train", "missing.yaml"], "not found"),
        (["train", "{cfg}", "optim.lrr=1"], "optim.lrr"),
        (["train", "{cfg}", "optim.lr"], "bad override"),
        (["train", "{cfg}", "data.root=/no/such/dir"], "/no/such/dir"),
        (["train", "--resume", "{tmp}"], "cannot resume"),
        (["train", "{cfg}", "model.encoder=resnet1"], "resnet18"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, words, color_folder, tmp_path, capsys):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs")))
    args = [a.format(cfg=cfg_path, tmp=tmp_path) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and words in err and "\n" not in err and "Traceback" not in err


def test_console_script_runs_and_overrides(color_folder, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs")))
    proc = subprocess.run(
        [sys.executable, "-m", "mtl", "train", str(cfg_path), "train.epochs=1", "optim.lr=0.02"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "epoch   1/1" in proc.stdout
    (d,) = list((tmp_path / "runs" / "tiny").iterdir())
    saved = yaml.safe_load((d / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 1 and saved["optim"]["lr"] == 0.02


def test_stages_pass_the_pretrained_encoder_on_and_print_a_table(color_folder, tmp_path, capsys):
    from mtl.workflows.stages import train_from_file

    raw = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2})
    raw["stages"] = [
        {"name": "source"},
        {"name": "fixed", "model": {"weights": "stage:source", "freeze": "all"}},
        {"name": "scratch", "model": {"weights": None}},
    ]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(raw))
    summaries = train_from_file(str(path), [])
    assert [s["name"] for s in summaries] == ["source", "fixed", "scratch"]
    (root,) = list((tmp_path / "runs" / "tiny").iterdir())
    assert (root / "results.md").is_file() and (root / "summary.json").is_file()
    fixed_cfg = yaml.safe_load((root / "fixed" / "config.yaml").read_text())
    assert fixed_cfg["model"]["weights"] == f"run:{root / 'source'}"
    source = load_checkpoint(root / "source" / "checkpoints" / "best.pt")["model"]
    fixed = load_checkpoint(root / "fixed" / "checkpoints" / "last.pt")["model"]
    enc = [k for k in source if k.startswith("encoder.")]
    assert enc and all(torch.equal(source[k], fixed[k]) for k in enc)  # frozen: still the source encoder
    assert summaries[1]["params"]["trainable"] < summaries[2]["params"]["trainable"]
    out = capsys.readouterr().out
    assert "| fixed |" in out and "| scratch |" in out


def test_an_interrupted_staged_run_resumes_as_a_whole_and_a_stage_config_reproduces_at_the_top(
    color_folder, tmp_path, capsys
):
    """Stages with summary.json are reused, the one with only last.pt resumes, later ones run (``stage:`` still
    naming the earlier stage's run), then the root's results are written; a complete root says so; a stage's
    config.yaml writes a new top-level run."""
    from mtl.workflows.stages import train_from_file

    raw = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2})
    raw["stages"] = [{"name": "source"}, {"name": "fixed", "model": {"weights": "stage:source", "freeze": "all"}}]
    raw["stages"].append({"name": "last", "model": {"weights": "stage:fixed"}})
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(raw))
    first = train_from_file(str(path), [])
    (root,) = list((tmp_path / "runs" / "tiny").iterdir())
    assert (root / ".lock").is_file()  # the pipeline's own lock, next to each stage's
    source_summary = (root / "source" / "summary.json").read_bytes()
    for gone in ("summary.json", "results.md", "fixed/summary.json"):
        (root / gone).unlink()
    shutil.rmtree(root / "last")
    capsys.readouterr()

    with _held(root):
        assert main(["train", "--resume", str(root)]) == 2
    assert "is in use" in capsys.readouterr().err and not (root / "last").exists()

    assert main(["train", "--resume", str(root / "fixed")]) == 0  # a stage's folder resumes its whole run
    out = capsys.readouterr().out
    assert f"is part of the run {root}" in out and "source (done: reused)" in out
    assert (root / "source" / "summary.json").read_bytes() == source_summary
    saved = json.loads((root / "summary.json").read_text())
    assert [s["name"] for s in saved["stages"]] == ["source", "fixed", "last"]
    for again, before in zip(saved["stages"], first):
        assert again["epochs"] == 2 and again["best"]["val"]["acc"] == before["best"]["val"]["acc"], again["name"]
    fixed_lines = (root / "fixed" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in fixed_lines] == [1, 2]
    assert yaml.safe_load((root / "last" / "config.yaml").read_text())["model"]["weights"] == f"run:{root / 'fixed'}"
    assert "| last |" in (root / "results.md").read_text()

    assert main(["train", "--resume", str(root)]) == 0
    assert capsys.readouterr().out.strip() == f"{root} is complete: every stage has its summary.json; nothing to resume"

    stage_cfg = yaml.safe_load((root / "fixed" / "config.yaml").read_text())
    assert stage_cfg["out_dir"] == str(tmp_path / "runs") and stage_cfg["name"] == "fixed"
    (again,) = train_from_file(str(root / "fixed" / "config.yaml"), ["train.epochs=1"])
    assert Path(again["run_dir"]).parent == tmp_path / "runs" / "fixed"  # at the top level, not inside the root
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["fixed", "last", "source"]


def test_stage_reference_to_a_later_stage_is_an_error(color_folder, tmp_path):
    from mtl.config.load import load_config
    from mtl.config.stages import stage_configs
    from mtl.core.errors import UserError

    raw = tiny_config(color_folder, tmp_path / "runs")
    raw["stages"] = [{"name": "a", "model": {"weights": "stage:b"}}, {"name": "b"}]
    path = tmp_path / "staged.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match="names no earlier stage"):
        stage_configs(*load_config(path))
    raw["stages"] = [{"name": "a", "optim": {"lrr": 1}}]
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(UserError, match=r"optim\.lrr.*stage 'a'"):
        stage_configs(*load_config(path))


def test_corrupt_images_are_skipped_and_counted(color_folder, tmp_path):
    (color_folder / "train" / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (color_folder / "val" / "blue" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning):
        summary = run(build_config(tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 1})), quiet=True)
    assert summary["skipped_images"] == 2 and summary["train_size"] == 48


def test_l2sp_and_lr_mult_run(color_folder, tmp_path):
    cfg = build_config(
        tiny_config(
            color_folder,
            tmp_path / "runs",
            **{"train.epochs": 1, "optim.l2sp": 0.01, "optim.lr_mult": {"encoder": 0.1}, "optim.weight_decay": 1e-4},
        )
    )
    summary = run(cfg, quiet=True)
    assert summary["final"]["train"]["loss"] > 0


def test_weights_cli(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert main(["weights", "list"]) == 0
    assert main(["weights", "import", str(tmp_path / "missing.pth")]) == 2
    assert "mtl: error:" in capsys.readouterr().err


def test_trainer_options_and_the_old_keywords_give_the_same_trainer():
    """``Trainer(..., options)`` and ``Trainer(..., epochs=..., device=..., ...)`` (the keywords from before
    TrainerOptions, still documented in docs/extending.md) set the same settings; a keyword given with ``options``
    overrides that field, and an unknown keyword is a TypeError as before."""
    from mtl.data.mix import BatchMix
    from mtl.engine.trainer import Trainer, TrainerOptions
    from mtl.tasks.base import build_task

    model = torch.nn.Linear(3, 2)
    tasks = {"label": build_task("label", type="classification", target="label", num_classes=2)}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    generator, monitor = torch.Generator(), lambda m: -m["loss"]
    settings = dict(
        epochs=3,
        device=torch.device("cpu"),
        amp=True,
        grad_clip=1.5,
        progress=False,
        seed=7,
        generator=generator,
        grad_on="representation",
        monitor=monitor,
        delta_m=monitor,
        channels_last=True,
        nonfinite="skip",
        mix=BatchMix(seed=7),
        accumulate=2,
        steps=40,
        val_every=2,
    )
    old = Trainer(model, tasks, {}, opt, None, **settings)
    options = TrainerOptions(**settings)
    new = Trainer(model, tasks, {}, opt, None, options)
    assert vars(old.options) == vars(new.options) == settings
    for name, value in settings.items():
        assert getattr(old, name) is value and getattr(new, name) is value, name
    new.epochs = 1  # attributes write through to the trainer's own copy of the options
    assert new.options.epochs == 1 and options.epochs == 3
    both = Trainer(model, tasks, {}, opt, options=options, epochs=5)
    assert both.epochs == 5 and both.seed == 7 and options.epochs == 3
    plain = Trainer(model, tasks, {}, opt, epochs=2, device="cpu")
    assert plain.device == torch.device("cpu") and plain.monitor is not None and plain.scheduler is None
    with pytest.raises(TypeError, match="unexpected keyword argument 'epoch'"):
        Trainer(model, tasks, {}, opt, None, epoch=3, device=torch.device("cpu"))
    with pytest.raises(TypeError, match="epochs"):
        Trainer(model, tasks, {}, opt, None, device=torch.device("cpu"))


class RecordEpochs(Hook):
    """A hook the tests register: after every epoch it records (tag, epoch, the trainer's hooks by class)."""

    seen: list = []

    def __init__(self, tag: str = "x") -> None:
        self.tag = tag

    def after_epoch(self, trainer, metrics):
        RecordEpochs.seen.append((self.tag, metrics["epoch"], [type(h).__name__ for h in trainer.hooks]))


def test_a_hook_named_in_the_config_runs_after_mtls_own(color_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(HOOKS._entries, "record_epochs", RecordEpochs)  # what @HOOKS.register("record_epochs") does
    monkeypatch.setattr(RecordEpochs, "seen", [])
    raw = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2})
    raw["train"]["hooks"] = ["record_epochs", {"name": "record_epochs", "options": {"tag": "b"}}]
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    assert main(["train", str(cfg_path), "train.progress=false"]) == 0
    own = ["UnfreezeHook", "MetricsFileHook", "TensorBoardHook", "CheckpointHook", "ConsoleHook", "ChanceWarningHook"]
    hooks = own + ["RecordEpochs", "RecordEpochs"]
    assert RecordEpochs.seen == [("x", 1, hooks), ("b", 1, hooks), ("x", 2, hooks), ("b", 2, hooks)]
    (d,) = (tmp_path / "runs" / "tiny").iterdir()
    assert yaml.safe_load((d / "config.yaml").read_text())["train"]["hooks"] == [
        {"name": "record_epochs", "options": {}},
        {"name": "record_epochs", "options": {"tag": "b"}},
    ]


def needs_every(every: int) -> Hook:
    return Hook()


@pytest.mark.parametrize(
    "hooks, words",
    [
        ("[early_stoping]", "unknown hook 'early_stoping'. Did you mean early_stopping?"),
        (
            "[{name: early_stopping, options: {patiense: 3}}]",
            "train.hooks[0]: unknown option(s) patiense for hook 'early_stopping'; known: patience, min_delta",
        ),
        (
            "[early_stopping, {name: early_stopping, options: {patience: 0}}]",
            "hook 'early_stopping': patience must be an integer >= 1, got 0",
        ),
        ("[needs_every]", "train.hooks[0]: hook 'needs_every' needs option(s) every"),
        ("[not_a_hook]", "train.hooks[0]: hook 'not_a_hook' built a object, not a Hook"),
        ("[{options: {patience: 3}}]", "missing required config value 'train.hooks.0.name'"),
    ],
)
def test_unknown_hooks_or_options_exit_2_with_one_line_and_no_run_directory(
    hooks, words, color_folder, tmp_path, capsys, monkeypatch
):
    monkeypatch.setitem(HOOKS._entries, "needs_every", needs_every)
    monkeypatch.setitem(HOOKS._entries, "not_a_hook", object)
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config(color_folder, tmp_path / "runs")))
    assert main(["train", str(cfg_path), f"train.hooks={hooks}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mtl: error:") and words in err and "\n" not in err, err
    assert not (tmp_path / "runs").exists()


def test_early_stopping_ends_training_and_a_resumed_run_stays_ended(color_folder, tmp_path):
    raw = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 6})
    raw["train"]["hooks"] = [{"name": "early_stopping", "options": {"patience": 1, "min_delta": 1.0}}]
    summary = run(build_config(raw), quiet=True)  # no accuracy rises by more than 1: the second epoch is the last
    assert summary["epochs"] == 2 and summary["final"]["epoch"] == 2
    lines = (tmp_path / "runs" / "tiny").glob("*/metrics.jsonl")
    assert [json.loads(x)["epoch"] for x in next(lines).read_text().splitlines()] == [1, 2]
    again = resume_run(summary["run_dir"])
    assert again["epochs"] == 2 and again["best"] == summary["best"]


def test_metrics_csv_holds_the_same_epochs_as_metrics_jsonl(tmp_path, color_folder):
    import csv

    from mtl.engine.hooks import flat_row

    cfg = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2, "train.log_images": 0})
    summary = run(build_config(cfg))
    run_dir = tmp_path / "runs" / "tiny" / summary["run_dir"].split("/")[-1]
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(epochs) == 2
    assert {"epoch", "train.loss", "val.acc", "val.tasks.label.acc", "lr.0", "is_best"} <= set(rows[0])
    for row, epoch in zip(rows, epochs):
        flat = flat_row(epoch)
        assert set(row) == set(flat)
        for key, value in flat.items():
            assert row[key] == str(value), key  # Python's float repr round-trips exactly
    assert flat_row({"a": {"b": [1, {"c": 2}]}}) == {"a.b.0": 1, "a.b.1.c": 2}


def test_a_run_ends_with_one_line_naming_its_best_epoch_and_where_it_was_written(tmp_path, color_folder, capsys):
    cfg = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 2, "train.log_images": 0})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    (run_dir,) = (tmp_path / "runs" / "tiny").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    best = summary["best"]
    assert last.startswith(f"done: best epoch {best['epoch']} of 2 (train.monitor auto): val loss ")
    assert f"acc {best['val']['acc']:.4f}" in last and last.endswith(f"written to {run_dir}")


@contextmanager
def _held(run_dir):
    """``run_dir``'s lock held as a training process holds it."""
    from mtl.core.rundir import lock_run_dir

    lock = lock_run_dir(run_dir)
    try:
        yield
    finally:
        lock.release()
