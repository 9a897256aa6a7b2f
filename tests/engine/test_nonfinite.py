"""train.nonfinite covers task gradients as well as losses: stop naming the task, or skip the step leaving no trace."""

import copy

import pytest
import torch
from conftest import tiny_config

from mtl.build.experiment import build_experiment
from mtl.config.load import build_config
from mtl.core.errors import UserError
from mtl.engine.optim import build_optimizer
from mtl.engine.trainer import Trainer, _Meter
from mtl.tasks.classification import Classification
from mtl.workflows.train import run

torch.set_num_threads(1)


def _two_task_config(folder, out, weighting, **extra):
    cfg = tiny_config(folder, out, **{"train.epochs": 1, "train.log_images": 0, **extra})
    cfg["tasks"] = {"a": {"target": "label"}, "b": {"target": "label", "head": {"name": "mlp", "hidden": 16}}}
    cfg["weighting"] = {"name": weighting}
    return cfg


def _poison_gradient(monkeypatch, task_name, when):
    """On the calls n (1, 2, ...) of task ``task_name``'s loss where ``when(n)``, the loss keeps its value but gets a
    nan gradient (0 * d sqrt(x) at x = 0). Training calls each task's loss once per step."""
    original = Classification.loss
    calls = {"n": 0}

    def loss(self, pred, target):
        value = original(self, pred, target)
        if self.name == task_name:
            calls["n"] += 1
            if when(calls["n"]):
                value = value + 0.0 * (pred.sum() * 0.0).sqrt()
        return value

    monkeypatch.setattr(Classification, "loss", loss)


@pytest.mark.parametrize("weighting,grad_on", [("gradvac", "params"), ("mgda", "representation"), ("imtl_g", "params")])
def test_a_nonfinite_task_gradient_stops_naming_the_task(color_folder, tmp_path, monkeypatch, weighting, grad_on):
    cfg = build_config(
        _two_task_config(color_folder, tmp_path / "runs", weighting, **{"weighting.grad_on": grad_on}), {}
    )
    _poison_gradient(monkeypatch, "b", lambda n: n > 2)
    with pytest.raises(
        UserError,
        match=r"non-finite gradient of task b's loss \(the loss itself is finite\) "
        r"at epoch 1, step 3; the last good checkpoint is kept",
    ):
        run(cfg, quiet=True)


def test_a_nonfinite_combined_gradient_stops_for_loss_level_methods(color_folder, tmp_path, monkeypatch):
    cfg = build_config(_two_task_config(color_folder, tmp_path / "runs", "famo"), {})
    _poison_gradient(monkeypatch, "a", lambda n: True)
    with pytest.raises(
        UserError,
        match=r"non-finite gradient of the combined loss \(every task loss is finite\) "
        r"at epoch 1, step 1",
    ):
        run(cfg, quiet=True)


@pytest.mark.parametrize(
    "weighting,grad_on",
    [
        ("gradvac", "params"),
        ("pcgrad", "representation"),
        ("famo", "params"),
        ("gradnorm", "params"),
        ("rlw", "params"),
    ],
)
def test_a_skipped_step_changes_nothing(color_folder, tmp_path, monkeypatch, weighting, grad_on):
    """Model, optimizer and the weighting's state (running targets, learned weights, random draws) stay as they were."""
    cfg = build_config(
        _two_task_config(
            color_folder,
            tmp_path / "runs",
            weighting,
            **{"weighting.grad_on": grad_on, "optim.name": "sgd", "optim.lr": 0.1},
        ),
        {},
    )
    exp = build_experiment(cfg)
    optimizer = build_optimizer(exp.model, cfg.optim)
    trainer = Trainer(
        exp.model,
        exp.tasks,
        exp.loaders,
        optimizer,
        None,
        epochs=1,
        device=exp.device,
        weighting=exp.weighting,
        grad_on=grad_on,
        progress=False,
        nonfinite="skip",
    )
    batches = iter(exp.loaders["train"])
    exp.model.train()
    for _ in range(2):  # some state first: targets, momenta, draws
        trainer.step(next(batches), _Meter(exp.tasks, exp.device), True)
    before = (
        copy.deepcopy(exp.model.state_dict()),
        copy.deepcopy(optimizer.state_dict()),
        copy.deepcopy(exp.weighting.state_dict()),
        trainer.global_step,
    )
    _poison_gradient(monkeypatch, "b", lambda n: True)
    meter = _Meter(exp.tasks, exp.device)
    trainer.step(next(batches), meter, True)
    assert trainer.skipped_steps == 1 and meter.n == 0
    after = (exp.model.state_dict(), optimizer.state_dict(), exp.weighting.state_dict(), trainer.global_step)
    for key in before[0]:
        assert torch.equal(before[0][key], after[0][key]), key
    assert str(before[1]) == str(after[1])
    assert before[2].keys() == after[2].keys()
    for key in before[2]:
        old, new = before[2][key], after[2][key]
        assert torch.equal(old, new) if torch.is_tensor(old) else old == new, key
    assert before[3] == after[3]


def test_skipping_nonfinite_gradients_trains_on(color_folder, tmp_path, monkeypatch):
    cfg = build_config(_two_task_config(color_folder, tmp_path / "runs", "gradvac", **{"train.nonfinite": "skip"}), {})
    _poison_gradient(monkeypatch, "b", lambda n: n in (2, 4))
    summary = run(cfg, quiet=True)
    assert summary["skipped_steps"] == 2
    state = torch.load(f"{summary['run_dir']}/checkpoints/last.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert torch.isfinite(state["weighting"]["phi_hat"]).all()


def test_nonfinite_off_checks_nothing(color_folder, tmp_path, monkeypatch):
    cfg = build_config(_two_task_config(color_folder, tmp_path / "runs", "equal", **{"train.nonfinite": "off"}), {})
    _poison_gradient(monkeypatch, "b", lambda n: True)
    summary = run(cfg, quiet=True)
    assert summary["skipped_steps"] == 0
