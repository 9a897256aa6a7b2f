"""train.steps and train.val_every: a step budget makes exactly that many updates over epochs of the data, its lr
schedule spans those steps, unfreeze events come at a step, validation comes every N-th epoch and after the last,
and a run with both, killed mid-epoch and resumed, ends with the uninterrupted run's weights."""

import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_folder, sigterm_at_step, tiny_config
from test_bad_input import refused
from torch import nn

from mtl.config.load import build_config
from mtl.config.schema import OptimCfg, SchedCfg, TrainCfg, UnfreezeCfg
from mtl.core.checkpoint import load_checkpoint
from mtl.data.loaders import collate_targets
from mtl.engine.budget import run_budget
from mtl.engine.hooks import EarlyStoppingHook, UnfreezeHook, top_epochs
from mtl.engine.optim import build_scheduler
from mtl.engine.trainer import Hook, Trainer
from mtl.tasks.classification import Classification
from mtl.workflows.stages import train_from_file
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")

N_ITEMS, BATCH = 20, 4  # 5 batches an epoch


class _Items(torch.utils.data.Dataset):
    def __init__(self, n=N_ITEMS):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 4, 4, generator=g)
        self.y = torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class _Counted:
    """A loader that counts the batches drawn from it."""

    def __init__(self, loader):
        self.loader, self.batches, self.passes = loader, 0, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        self.passes += 1
        for batch in self.loader:
            self.batches += 1
            yield batch


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(OrderedDict(flat=nn.Flatten(), fc=nn.Linear(16, 8), act=nn.Tanh()))
        self.heads = nn.ModuleDict({"label": nn.Linear(8, 3)})

    def forward(self, x):
        return {"label": self.heads["label"](self.encoder(x))}

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self):
        return self.heads.parameters()


class _Record(Hook):
    """Per update: the lr it used, the steps made before it, a copy of the encoder's fc weight after it."""

    def __init__(self, model):
        self.model, self.lrs, self.before, self.after, self.fc = model, [], [], [], []

    def before_step(self, trainer):
        self.lrs.append(trainer.optimizer.param_groups[0]["lr"])
        self.before.append(trainer.steps_done)

    def after_step(self, trainer, losses):
        self.after.append((trainer.steps_done, trainer.global_step))
        self.fc.append(self.model.encoder.fc.weight.detach().clone())


def _trainer(steps=None, epochs=50, accumulate=1, val_every=1, sched=None, hooks=(), unfreeze=(), **options):
    torch.manual_seed(0)
    model = _Model()
    generator = torch.Generator()
    collate = collate_targets({"label": "label"})
    train = torch.utils.data.DataLoader(_Items(), BATCH, shuffle=True, generator=generator, collate_fn=collate)
    val = torch.utils.data.DataLoader(_Items(8), BATCH, collate_fn=collate)
    loaders = {"train": _Counted(train), "val": _Counted(val)}
    if unfreeze:
        model.encoder.requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    budget = run_budget(TrainCfg(epochs=epochs, steps=steps, accumulate=accumulate), len(train))
    scheduler = None
    if sched is not None:
        scheduler = build_scheduler(optimizer, sched, budget.epochs, budget.per_epoch, steps)
    record = _Record(model)
    own = [UnfreezeHook(model.encoder, list(unfreeze), OptimCfg(name="sgd", lr=0.1))] if unfreeze else []
    trainer = Trainer(
        model,
        {"label": Classification("label", "label", 3)},
        loaders,
        optimizer,
        scheduler,
        epochs=budget.epochs,
        device=torch.device("cpu"),
        progress=False,
        generator=generator,
        accumulate=accumulate,
        steps=steps,
        val_every=val_every,
        hooks=[*own, record, *hooks],
        **options,
    )
    return trainer, record, budget


@pytest.mark.parametrize(
    "accumulate, epochs, batches",
    [(1, 2, 5 + 2), (2, 3, 5 + 5 + 2)],  # 5 updates an epoch (5 batches); 3 (batches 2 2 1): 3 + 3 + 1
)
def test_a_step_budget_makes_exactly_that_many_updates(accumulate, epochs, batches):
    trainer, record, budget = _trainer(steps=7, accumulate=accumulate)
    trainer.fit()
    assert budget.epochs == epochs and budget.total == 7
    assert len(record.after) == trainer.global_step == trainer.steps_done == 7
    assert [s for s, _ in record.after] == list(range(1, 8)) and record.before == list(range(7))
    assert trainer.loaders["train"].batches == batches  # updates, not batches; no batch drawn beyond the budget
    assert [m["epoch"] for m in trainer.history] == list(range(1, epochs + 1))
    assert "val" in trainer.history[-1]  # the cut last epoch is validated and logged like any other


def test_the_budget_ends_the_run_whatever_epochs_says():
    trainer, record, _ = _trainer(steps=6, epochs=50)
    trainer.fit()
    assert trainer.epoch == 2 and trainer.global_step == 6


@pytest.mark.parametrize(
    "sched, expected",
    [
        # cosine over the 13 steps (not 3 whole epochs of 5), to min_lr_ratio, times a one-epoch (5-step) warmup
        (
            SchedCfg(name="cosine", min_lr_ratio=0.1, warmup_epochs=1),
            lambda k: (0.1 + 0.9 * (1 + math.cos(math.pi * k / 13)) / 2) * min(1.0, (k + 1) / 5),
        ),
        (SchedCfg(name="step", step_size=1, gamma=0.5), lambda k: 0.5 ** (k // 5)),  # step_size counts epochs
    ],
    ids=["cosine", "step"],
)
def test_the_schedule_spans_the_step_budget(sched, expected):
    trainer, record, _ = _trainer(steps=13, sched=sched)
    trainer.fit()
    assert len(record.lrs) == 13
    for k, lr in enumerate(record.lrs):
        assert lr == pytest.approx(0.1 * expected(k), rel=1e-12, abs=1e-15), k
    if sched.name == "cosine":  # after the last update the schedule stands at its end
        assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1, rel=1e-12)


@pytest.mark.parametrize("s", [0, 7, 10])  # before the first update, inside the second epoch, at the third's start
def test_unfreezing_at_step_s_comes_between_updates_s_minus_1_and_s(s):
    trainer, record, _ = _trainer(steps=12, unfreeze=[UnfreezeCfg(step=s, modules=["fc"])])
    start = trainer.model.encoder.fc.weight.detach().clone()
    trainer.fit()
    for k, fc in enumerate(record.fc):  # record.fc[k]: after update k (0-based)
        assert torch.equal(fc, start) == (k < s), k
    assert len(trainer.optimizer.param_groups) == 2


def test_validation_every_n_epochs_and_after_the_last_and_best_only_among_them():
    scores = iter([0.1, 0.9, 0.2, 0.5, 0.7, 0.3, 0.4])  # by validation, never by epoch
    trainer, _, _ = _trainer(epochs=7, val_every=3, monitor=lambda m: next(scores))
    trainer.fit()
    assert trainer.loaders["val"].passes == 3  # epochs 3, 6 and 7 (the last)
    validated = [m["epoch"] for m in trainer.history if "val" in m]
    assert validated == [3, 6, 7]
    assert [m["score"] for m in trainer.history] == [None, None, 0.1, None, None, 0.9, 0.2]
    assert [m["epoch"] for m in trainer.history if m["is_best"]] == [3, 6] and trainer.best["epoch"] == 6
    assert top_epochs(trainer.history, 2) == {6, 7}


def test_early_stopping_patience_counts_validations():
    stop = EarlyStoppingHook(patience=2, min_delta=10.0)  # no score rises by 10: stale from the second validation on
    trainer, _, _ = _trainer(epochs=20, val_every=3, hooks=[stop])
    trainer.fit()
    assert trainer.epoch == 9  # validations at epochs 3, 6 and 9: the third is the second stale one
    assert trainer.loaders["val"].passes == 3


# --------------------------------------------------------------------------- whole runs


def _run_config(tmp_path, out, **overrides):
    folder = make_folder(tmp_path / "data", per_class=(16, 4), size=16)  # 48 train images: 6 steps of 8 an epoch
    raw = tiny_config(
        folder,
        out,
        **{
            "data.image_size": 16,
            "data.resize_size": 16,
            "train.steps": 15,  # 3 epochs: 6 + 6 + 3 steps
            "train.val_every": 2,
            "train.deterministic": True,
            "train.log_images": 0,
            "sched.name": "cosine",
            "sched.min_lr_ratio": 0.5,
            **overrides,
        },
    )
    return raw


def _epochs(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_step_budget_run_killed_twice_and_resumed_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    raw = _run_config(tmp_path, tmp_path / "whole", **{"model.freeze": "all"})
    raw["train"]["unfreeze"] = [{"step": 8, "modules": ["stage4"]}, {"epoch": 1, "modules": ["stage3"]}]
    whole = run(build_config(raw), quiet=True)
    assert whole["steps"] == 15 and whole["epochs"] == 3
    assert whole["budget"] == {"unit": "steps", "epochs": 3, "steps": 15, "steps_per_epoch": 6, "val_every": 2}
    lines = _epochs(whole["run_dir"])
    assert [("val" in m, m["score"] is not None) for m in lines] == [(False, False), (True, True), (True, True)]
    assert lines[-1]["lr"][0] == pytest.approx(0.01 * 0.5, rel=1e-9)  # the cosine spans the 15 steps

    raw["out_dir"] = str(tmp_path / "part")
    sigterm_at_step(monkeypatch, 10)  # inside epoch 2, after both unfreeze events
    with pytest.raises(KeyboardInterrupt):
        run(build_config(raw), quiet=True)
    (run_dir,) = (tmp_path / "part" / "tiny").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["partial"]["step"] == 4
    sigterm_at_step(monkeypatch, 14)  # inside the cut last epoch
    with pytest.raises(KeyboardInterrupt):
        resume_run(str(run_dir))
    monkeypatch.undo()
    resumed = resume_run(str(run_dir))
    assert resumed["steps"] == 15 and resumed["epochs"] == 3
    a = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert [len(g["params"]) for g in a["optimizer"]["param_groups"]] == [
        len(g["params"]) for g in b["optimizer"]["param_groups"]
    ]
    again = _epochs(run_dir)
    assert [m.get("val") for m in again] == [m.get("val") for m in lines]  # the same validations, the same values
    assert resumed["best"]["epoch"] == whole["best"]["epoch"]


def test_each_stage_keeps_its_own_budget_and_validation_schedule_cached_features_too(tmp_path):
    raw = _run_config(tmp_path, tmp_path / "runs", **{"train.steps": 8, "data.augment": "none"})
    raw["stages"] = [
        {"name": "heads", "model": {"freeze": "all"}},  # a frozen encoder: trained on cached features
        {"name": "short", "train": {"steps": 3, "val_every": 1}},
    ]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    heads, short = train_from_file(str(path), [])
    assert "encoder features cached once" in heads["pipeline"] and "cached" not in short["pipeline"]
    assert (heads["steps"], heads["epochs"], short["steps"], short["epochs"]) == (8, 2, 3, 1)  # 6 + 2 steps; 3
    assert ["val" in m for m in _epochs(heads["run_dir"])] == [False, True]


@pytest.mark.parametrize(
    "train, words",
    [
        (
            {"steps": 10, "unfreeze": [{"step": 10, "modules": ["stage4"]}]},
            ["train.unfreeze[0]: step 10 never comes", "train.steps is 10", "from 0 to 9"],
        ),
        (
            {"epochs": 2, "unfreeze": [{"step": 12, "modules": ["stage4"]}]},
            ["train.unfreeze[0]: step 12 never comes", "the run has 12 (2 epochs of 6)", "from 0 to 11"],
        ),
        (
            {"steps": 7, "unfreeze": [{"epoch": 2, "modules": ["stage4"]}]},
            ["train.unfreeze[0]: epoch 2 never starts", "the run has 2 (train.steps 7)", "raise train.steps"],
        ),
        (
            {"steps": 12, "unfreeze": [{"epoch": 1, "step": 6, "modules": ["stage4"]}]},
            ["train.unfreeze.0", "exactly one of epoch", "and step", "got both"],
        ),
        (  # epoch 1 is step 6: it comes first, whatever the list's order
            {"steps": 12, "unfreeze": [{"step": 8, "modules": ["stage4"]}, {"epoch": 1, "modules": ["stage4"]}]},
            ["train.unfreeze[0]: 'stage4' already trains at step 8 (train.unfreeze[1] unfreezes it at epoch 1)"],
        ),
        (
            {"steps": 7, "swa": {"start_epoch": 2}},
            ["train.swa.start_epoch is 2 but the run has 2 epochs (train.steps 7 at 6 steps an epoch"],
        ),
        ({"steps": 0}, ["train.steps", "must be >= 1", "null trains train.epochs whole epochs"]),
        ({"val_every": 0}, ["train.val_every", "must be >= 1"]),
    ],
    ids=["step-past-budget", "step-past-epochs", "epoch-past-budget", "both", "order", "swa", "steps-0", "val-0"],
)
def test_bad_budgets_are_refused_in_one_line_before_anything_is_written(train, words, tmp_path, capsys):
    raw = _run_config(tmp_path, tmp_path / "runs", **{"model.freeze": "all"})
    raw["train"].pop("steps")
    raw["train"].update(train)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    refused(capsys, ["train", path], *words, runs=tmp_path / "runs")
