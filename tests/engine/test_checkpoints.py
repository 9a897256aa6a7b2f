"""train.checkpoints (the k best epochs, every n epochs) and train.early_stop."""

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch import nn

from mtl.config.load import build_config
from mtl.config.schema import Config
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.hooks import CheckpointHook, EarlyStoppingHook, top_epochs
from mtl.workflows.train import run


class FakeTrainer:
    """What CheckpointHook reads: the model, the completed epochs and their history, a resumable state."""

    def __init__(self):
        self.model, self.epoch, self.history = nn.Linear(2, 1), 0, []

    def state_dict(self):
        return {"model": self.model.state_dict(), "epoch": self.epoch}

    def finish_epoch(self, score, best):
        with torch.no_grad():
            self.model.bias.fill_(float(self.epoch + 1))  # the weights tell the epoch they were saved at
        self.epoch += 1
        metrics = {"epoch": self.epoch, "score": score, "is_best": best}
        self.history.append(metrics)
        return metrics


def _saved_epochs(folder):
    return sorted(int(p.stem.split("_")[1]) for p in folder.glob("epoch_*.pt"))


def test_the_k_best_epochs_are_kept_and_the_rest_deleted(tmp_path):
    hook, trainer = CheckpointHook(tmp_path, {}, keep_top_k=2, every=2), FakeTrainer()
    scores = [0.1, 0.5, 0.3, 0.7, 0.2, math.nan, 0.5]
    kept, best = [], -math.inf
    for s in scores:
        hook.after_epoch(trainer, trainer.finish_epoch(s, s > best))
        best = max(best, s) if not math.isnan(s) else best
        kept.append(_saved_epochs(tmp_path / "checkpoints" / "top"))
    assert kept == [[1], [1, 2], [2, 3], [2, 4], [2, 4], [2, 4], [2, 4]]  # a tie (epoch 7) loses to the earlier
    for epoch in (2, 4):
        saved = load_checkpoint(tmp_path / "checkpoints" / "top" / f"epoch_{epoch:04d}.pt")
        assert saved["epoch"] == epoch and saved["model"]["bias"].item() == epoch
    assert _saved_epochs(tmp_path / "checkpoints") == [2, 4, 6]  # every 2 epochs
    assert load_checkpoint(tmp_path / "checkpoints" / "best.pt")["epoch"] == 4


def test_top_epochs_against_a_brute_force_ranking():
    rng = torch.Generator().manual_seed(0)
    for _ in range(50):
        scores = torch.randint(0, 5, (9,), generator=rng).tolist()
        history = [{"epoch": e + 1, "score": float(s)} for e, s in enumerate(scores)]
        for k in (1, 3, 9):
            # an epoch is kept when fewer than k epochs beat it (a higher score, or the same score earlier)
            expected = {
                h["epoch"]
                for h in history
                if sum(1 for o in history if (o["score"], -o["epoch"]) > (h["score"], -h["epoch"])) < k
            }
            assert top_epochs(history, k) == expected


def test_keep_top_k_1_writes_only_best_pt(tmp_path):
    hook, trainer = CheckpointHook(tmp_path, {}), FakeTrainer()
    hook.after_epoch(trainer, trainer.finish_epoch(0.5, True))
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


def _config(**train):
    return build_config({"name": "x", "data": {"name": "shapes"}, "train": train})


def test_early_stop_is_the_early_stopping_hook_by_a_key_of_its_own():
    from mtl.build.training import config_hooks

    (hook,) = config_hooks(_config(early_stop={"patience": 2, "min_delta": 0.01}))
    assert isinstance(hook, EarlyStoppingHook) and (hook.patience, hook.min_delta) == (2, 0.01)
    assert config_hooks(_config()) == []
    assert isinstance(_config(), Config) and _config().train.checkpoints.keep_top_k == 1


@pytest.mark.parametrize(
    "train, message",
    [
        ({"early_stop": {"patience": 2}, "hooks": ["early_stopping"]}, "both stop early; keep one"),
        ({"early_stop": {"patience": 0}}, "train.early_stop.patience"),
        ({"checkpoints": {"keep_top_k": 0}}, "train.checkpoints.keep_top_k"),
        ({"checkpoints": {"every_n_epochs": 0}}, "train.checkpoints.every_n_epochs"),
    ],
)
def test_bad_checkpoint_and_early_stop_keys_are_one_line(train, message):
    with pytest.raises(UserError, match=message) as info:
        _config(**train)
    assert "\n" not in str(info.value)


def test_a_run_keeps_its_best_epochs_and_periodic_checkpoints(color_folder, tmp_path):
    """Through a real run: the top files are the best epochs of its metrics.jsonl."""
    raw = tiny_config(color_folder, tmp_path / "runs", **{"train.epochs": 3, "train.log_images": 0})
    raw["train"]["checkpoints"] = {"keep_top_k": 2, "every_n_epochs": 2}
    summary = run(build_config(raw), quiet=True)
    folder = Path(summary["run_dir"]) / "checkpoints"
    history = [json.loads(line) for line in (folder.parent / "metrics.jsonl").read_text().splitlines()]
    assert _saved_epochs(folder / "top") == sorted(top_epochs(history, 2))
    assert _saved_epochs(folder) == [2]
