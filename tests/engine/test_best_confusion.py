"""The validation confusion matrices TensorBoard gets at the end of a run come from the validation pass that selected
the best weights (the EMA pass with train.ema, SWA's when its weights are delivered), survive a resume mid-epoch, and
cost no pass of their own: a counting wrapper around the validation loader sees one pass per epoch (and SWA's), none
after. Each matrix is checked against best.pt run over the validation loader and counted with numpy."""

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_folder, tiny_config

from mtl.config.load import build_config
from mtl.core.checkpoint import load_checkpoint
from mtl.engine import hooks as engine_hooks
from mtl.engine.hooks import HOOKS
from mtl.engine.trainer import Hook
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")


class _Counted:
    """A loader that counts the passes over it and is otherwise the loader it wraps."""

    def __init__(self, loader, counter):
        self.loader, self.counter = loader, counter

    def __iter__(self):
        self.counter["passes"] += 1
        return iter(self.loader)

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.loader, name)


class _CountVal(Hook):
    """Counts validation passes (per epoch, and at the end after every other hook), makes the epoch that ``prefer``s
    (first: the first epoch, last: the latest weights, SWA's once delivered) the best, and keeps the model and the
    validation loader for the independent count. ``stop_at``: ask to stop after that optimizer update."""

    runs: list = []
    stop_at = None

    def __init__(self, prefer: str = "first") -> None:
        self.prefer, self.counter, self.after_epochs = prefer, {"passes": 0}, []
        _CountVal.runs.append(self)

    def before_train(self, trainer):
        sign = -1 if self.prefer == "first" else 1
        trainer.monitor = lambda phase: sign * trainer.epoch
        self.loader = trainer.loaders["val"]
        trainer.loaders["val"] = _Counted(self.loader, self.counter)

    def after_step(self, trainer, losses):
        if trainer.global_step == _CountVal.stop_at:
            trainer.request_stop()

    def after_epoch(self, trainer, metrics):
        self.after_epochs.append(self.counter["passes"])

    def after_train(self, trainer):  # after TensorBoardHook drew its matrices
        self.at_end, self.model = self.counter["passes"], trainer.model


@pytest.fixture
def drawn(monkeypatch):
    """What TensorBoardHook hands to ``confusion_image``: (title, matrix) per call."""
    calls = []
    original = engine_hooks.confusion_image

    def recording(matrix, classes, title=""):
        calls.append((title, matrix.clone()))
        return original(matrix, classes, title)

    monkeypatch.setattr(engine_hooks, "confusion_image", recording)
    monkeypatch.setitem(HOOKS._entries, "count_val", _CountVal)
    monkeypatch.setattr(_CountVal, "runs", [])
    return calls


def _config(folder, out, prefer="first", lr=0.01, **train):
    raw = tiny_config(folder, out, **{"data.image_size": 16, "data.resize_size": 16, "train.log_images": 0})
    raw["optim"]["lr"] = lr
    raw["model"]["encoder_options"] = {"widths": [4, 8]}
    raw["train"].update(epochs=2, deterministic=True, hooks=[{"name": "count_val", "options": {"prefer": prefer}}])
    raw["train"].update(train)
    return build_config(raw)


def _counted(model, loader, classes):
    """best.pt's confusion on ``loader`` in eval mode, as numpy counts of true * C + predicted."""
    model.eval()
    codes = []
    with torch.no_grad():
        for batch in loader:
            predicted = model(batch["image"])["label"].argmax(1).numpy()
            codes.append(batch["targets"]["label"].numpy() * classes + predicted)
    return np.bincount(np.concatenate(codes), minlength=classes * classes).reshape(classes, classes)


def _check_against_best_pt(summary, drawn, hook):
    (title, matrix), classes = drawn[-1], drawn[-1][1].shape[0]
    hook.model.load_state_dict(load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "best.pt")["model"])
    expected = _counted(hook.model, hook.loader, classes)
    assert matrix.tolist() == expected.tolist()
    assert matrix.sum() == len(hook.loader.dataset)  # every validation image once
    return title


@pytest.fixture
def small_folder(tmp_path):
    return make_folder(tmp_path / "colors", per_class=(8, 4), size=16)


def test_one_validation_pass_per_epoch_and_the_best_epochs_matrix_survives_a_resume(
    small_folder, tmp_path, drawn, monkeypatch
):
    whole = run(_config(small_folder, tmp_path / "a"), quiet=True)
    hook = _CountVal.runs[-1]
    assert whole["best"]["epoch"] == 1 and hook.after_epochs == [1, 2] and hook.at_end == 2
    assert hook.counter["passes"] == 2  # nor later in the run (the test split is not the validation split)
    assert len(drawn) == 1 and "best epoch 1" in _check_against_best_pt(whole, drawn, hook)

    monkeypatch.setattr(_CountVal, "stop_at", 4)  # 3 updates per epoch: stop after the second epoch's first
    with pytest.raises(KeyboardInterrupt):
        run(_config(small_folder, tmp_path / "b"), quiet=True)
    monkeypatch.setattr(_CountVal, "stop_at", None)
    (run_dir,) = (tmp_path / "b" / "tiny").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["partial"]["step"] == 1
    resumed = resume_run(str(run_dir))
    hook = _CountVal.runs[-1]
    assert resumed["best"]["epoch"] == 1 and hook.after_epochs == [1] and hook.at_end == hook.counter["passes"] == 1
    assert len(drawn) == 2 and torch.equal(drawn[1][1], drawn[0][1]) and drawn[1][0] == drawn[0][0]


@pytest.mark.parametrize("average", ["ema", "swa"])
def test_the_matrix_is_that_of_the_averaged_weights_that_were_selected(small_folder, tmp_path, drawn, average):
    """The latest weights win: with train.ema the final EMA weights (best.pt, not the trained ones), with train.swa
    the SWA weights, delivered as best.pt after their own validation pass. (The EMA's slow decay keeps it near the
    weights of the first update, which predict otherwise than the trained ones.)"""
    extra = {"ema": {"decay": 0.99}, "lr": 0.03} if average == "ema" else {"swa": {"start_epoch": 0}}
    summary = run(_config(small_folder, tmp_path / "runs", prefer="last", **extra), quiet=True)
    hook = _CountVal.runs[-1]
    if average == "ema":  # the trained weights' pass and the EMA weights' pass every epoch
        assert hook.after_epochs == [2, 4] and hook.at_end == hook.counter["passes"] == 4
        assert summary["best"]["epoch"] == 2
    else:
        assert hook.after_epochs == [1, 2] and hook.at_end == hook.counter["passes"] == 3
        assert summary["swa"]["delivered"]
    title = _check_against_best_pt(summary, drawn, hook)
    assert ("SWA of epochs 1-2" if average == "swa" else "best epoch 2") in title
    # the trained weights at the end count otherwise: the test tells the selected weights from them
    hook.model.load_state_dict(load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "last.pt")["model"])
    assert _counted(hook.model, hook.loader, 3).tolist() != drawn[-1][1].tolist()
