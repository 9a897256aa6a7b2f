"""BatchNorm statistics: model.bn_momentum on every layer, train.bn_recompute against a float64 computation of the
statistics from the image files, through a run whose lagging statistics validate at chance (the chance warning, the
delivery, a resume after it), and the chance warning's rule on constructed histories."""

import copy
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import make_folder, tiny_config
from PIL import Image
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from mtl.build.data import build_data
from mtl.build.experiment import build_experiment
from mtl.config.load import build_config
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.data.loaders import in_order
from mtl.engine import hooks as engine_hooks
from mtl.engine.averaging import training_pass
from mtl.engine.chance import ChanceWarningHook, at_chance
from mtl.models.batchnorm import set_bn_momentum
from mtl.tasks.classification import Classification
from mtl.tasks.regression import Regression
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")


def test_set_bn_momentum_sets_every_kind_of_batchnorm_and_nothing_else():
    model = nn.Sequential(
        nn.BatchNorm1d(3),
        nn.BatchNorm2d(3, momentum=0.01),  # as a TensorFlow port carries it
        nn.BatchNorm3d(3, momentum=None),
        nn.SyncBatchNorm(3),
        nn.Sequential(nn.LazyBatchNorm2d(), nn.LayerNorm(3), nn.GroupNorm(1, 3), nn.InstanceNorm2d(3)),
    )
    assert set_bn_momentum(model, 0.25) == 5
    momenta = [m.momentum for m in model.modules() if hasattr(m, "momentum")]
    assert momenta == [0.25] * 5 + [0.1]  # InstanceNorm2d is no BatchNorm: its own momentum stays


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("bn") / "colors", per_class=(8, 4), size=16)


def config(folder, out, **overrides):
    base = {"data.image_size": 16, "data.resize_size": 16, "train.log_images": 0}
    return build_config(tiny_config(folder, out, **base, **{"model.encoder_options": {"widths": [4, 8]}, **overrides}))


def test_model_bn_momentum_reaches_every_batchnorm_of_the_built_model(folder, tmp_path):
    model = build_experiment(config(folder, tmp_path, **{"model.bn_momentum": 0.03})).model
    layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(layers) == 4 and all(m.momentum == 0.03 for m in layers)  # 2 stages of 2 conv-BN-ReLU blocks
    plain = build_experiment(config(folder, tmp_path)).model  # null: as built
    assert [m.momentum for m in plain.modules() if isinstance(m, _BatchNorm)] == [0.1] * 4


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.bn_momentum": 0.5, "model.encoder_options": {"widths": [4], "norm": "group"}}, "has no BatchNorm"),
        ({"train.bn_recompute": True, "model.freeze": "all"}, "train.bn_recompute recomputes the statistics"),
    ],
)
def test_batchnorm_keys_without_a_layer_to_act_on_are_refused_in_one_line(folder, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message) as info:
        build_experiment(config(folder, tmp_path, **overrides))
    assert "\n" not in str(info.value) and not (tmp_path / "tiny").exists()


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"model": {"bn_momentum": 0}}, "model.bn_momentum"),
        ({"model": {"bn_momentum": 1.5}}, "model.bn_momentum"),
        ({"train": {"bn_recompute": True, "swa": {"start_epoch": 0}}}, "train.swa already recomputes"),
        ({"model": {"bn_momentum": 0.1}, "continual": {"methods": ["finetune"]}}, "not supported in continual runs"),
        ({"train": {"bn_recompute": True}, "continual": {"methods": ["finetune"]}}, "not supported in continual runs"),
    ],
)
def test_bad_batchnorm_keys_are_one_line(raw, message):
    with pytest.raises(UserError, match=message) as info:
        build_config(raw)
    assert "\n" not in str(info.value)


def test_the_recompute_pass_reads_every_training_image_once_shuffled_by_the_seed(folder, tmp_path):
    for pipeline in ("batched", "items"):
        _, _, loaders, _, _ = build_data(config(folder, tmp_path, **{"data.pipeline": pipeline}), torch.device("cpu"))
        ordered = torch.cat([b["targets"]["label"] for b in in_order(loaders["train"])])
        one, two = ([b["targets"]["label"] for b in training_pass(loaders["train"], s)] for s in (3, 3))
        assert [len(b) for b in one] == [8, 8, 8] and ordered.tolist() == sorted(ordered.tolist())  # by class
        assert sorted(torch.cat(one).tolist()) == ordered.tolist() and torch.equal(torch.cat(one), torch.cat(two))
        assert any(b.unique().numel() > 1 for b in one)  # shuffled: not one class a batch
    other = [b["targets"]["label"] for b in training_pass(loaders["train"], 4)]
    assert not torch.equal(torch.cat(one), torch.cat(other))  # another seed, another order


def _files(root):
    """The training images straight from their PNG files as float64 (N, 3, H, W) in [0, 1]."""
    paths = sorted((root / "train").glob("*/*.png"))
    return torch.stack(
        [torch.from_numpy(np.asarray(Image.open(p), dtype=np.float64)).permute(2, 0, 1) / 255 for p in paths]
    )


def _channel_mean_var(x):
    """Per channel of (N, C, H, W): the mean and the unbiased variance, summed in a plain float64 loop."""
    mean, var = [], []
    for c in range(x.shape[1]):
        values = x[:, c].reshape(-1).tolist()
        m = sum(values) / len(values)
        mean.append(m)
        var.append(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return torch.tensor(mean, dtype=torch.float64), torch.tensor(var, dtype=torch.float64)


def test_bn_recompute_rescues_lagging_statistics_and_equals_the_statistics_of_the_training_images(
    folder, tmp_path, capsys, monkeypatch
):
    # momentum 0.001: the running statistics barely leave their start (0, 1) while inputs in [0, 1] give every
    # channel a large mean, so each epoch validates at chance while the training batches (batch statistics) learn.
    # One batch of all 24 training images: the recomputed statistics are those of the whole split, whatever the order
    cfg = config(
        folder,
        tmp_path / "runs",
        **{"model.bn_momentum": 0.001, "train.bn_recompute": True, "data.batch_size": 24, "data.cache_size": 16},
        **{"data.augment": "none", "data.mean": [0, 0, 0], "data.std": [1, 1, 1], "model.freeze": {"until": "stage1"}},
    )
    drawn = []
    original = engine_hooks.confusion_image
    monkeypatch.setattr(
        engine_hooks,
        "confusion_image",
        lambda m, c, title="": drawn.append((title, m.clone())) or original(m, c, title),
    )
    summary = run(cfg, quiet=True)
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: epoch 2: validation accuracy at chance")
    assert "model.bn_momentum: 0.1 or train.bn_recompute: true" in warnings[0]
    bn = summary["bn_recompute"]
    assert summary["best"]["epoch"] == 1 and bn["val_before"]["acc"] == pytest.approx(1 / 3)  # every epoch at chance
    assert [c["epoch"] for c in bn["candidates"]] == [1, 3] and bn["epoch"] == 3  # the final weights validate best
    assert bn["delivered"] and bn["val"]["acc"] > 0.9 and bn["score"] > bn["score_before"] and bn["batches"] == 1
    # TensorBoard draws the delivered weights' validation matrix (taken from their validation pass), not epoch 1's
    ((title, matrix),) = drawn
    assert "epoch 3 with recomputed BatchNorm statistics" in title and int(matrix.sum()) == 12  # 4 images a class
    assert int(matrix.trace()) / 12 == pytest.approx(bn["val"]["acc"])

    checkpoints = Path(summary["run_dir"]) / "checkpoints"
    best, recomputed = load_checkpoint(checkpoints / "best.pt"), load_checkpoint(checkpoints / "best_bn.pt")
    last = load_checkpoint(checkpoints / "last.pt")["model"]
    assert all(torch.equal(best["model"][k], recomputed["model"][k]) for k in best["model"])
    stats = ("running_mean", "running_var", "num_batches_tracked")
    assert not torch.equal(
        recomputed["model"]["encoder.stage2.0.1.running_var"], last["encoder.stage2.0.1.running_var"]
    )
    for k, v in recomputed["model"].items():
        if not k.endswith(stats) or k.startswith("encoder.stage1."):  # weights, and frozen layers' statistics
            assert torch.equal(v, last[k]), k

    # independently: the final weights in float64, in training mode (stage1 frozen stays in eval mode), fed the
    # image files; each trained BatchNorm's running mean and variance are its inputs' mean and unbiased variance
    model = copy.deepcopy(build_experiment(cfg).model).double()
    model.load_state_dict(recomputed["model"])
    inputs = {}
    for name in ("encoder.stage2.0.1", "encoder.stage2.1.1"):
        layer = model.get_submodule(name)
        layer.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args[0].detach()))
    model.train()
    with torch.no_grad():
        model(_files(folder))
    assert len(inputs) == 2 and not model.encoder.stage1.training
    for name, x in inputs.items():
        mean, var = _channel_mean_var(x)
        assert torch.allclose(recomputed["model"][f"{name}.running_mean"].double(), mean, atol=1e-5), name
        assert torch.allclose(recomputed["model"][f"{name}.running_var"].double(), var, rtol=1e-4), name

    # stopped after best.pt was replaced (before summary.json): the resumed run computes the same again
    again = resume_run(summary["run_dir"])["bn_recompute"]
    assert {k: again[k] for k in ("epoch", "val", "score", "delivered")} == {
        k: bn[k] for k in ("epoch", "val", "score", "delivered")
    }
    resumed = load_checkpoint(checkpoints / "best.pt")["model"]
    assert all(torch.equal(resumed[k], best["model"][k]) for k in best["model"])
    assert not [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: ")]


def _epoch(train, val, task="label"):
    return {"train": {"tasks": {task: {"acc": train}}}, "val": {"tasks": {task: {"acc": val}}}}


TEN = {"label": Classification("label", "label", 10)}


@pytest.mark.parametrize(
    "history, warned",
    [
        ([_epoch(0.15, 0.10), _epoch(0.60, 0.11)], True),  # the constructed case: learns, validates at chance
        ([_epoch(0.15, 0.10), _epoch(0.60, 0.11), _epoch(0.9, 0.12)], True),
        ([_epoch(0.15, 0.12), _epoch(0.60, 0.45)], False),  # normal: validation follows
        ([_epoch(0.60, 0.10)], False),  # one epoch: nothing climbs yet
        ([_epoch(0.30, 0.10), _epoch(0.33, 0.10)], False),  # training accuracy not yet well above chance
        ([_epoch(0.70, 0.10), _epoch(0.60, 0.10)], False),  # and not climbing
        ([_epoch(0.15, 0.10), {"train": _epoch(0.6, 0)["train"]}], False),  # an epoch without validation
    ],
)
def test_the_chance_rule(history, warned):
    assert bool(at_chance(TEN, history)) == warned


def test_the_chance_rule_counts_classification_tasks_only_each_against_its_own_chance():
    tasks = {"two": Classification("two", "two", 2), "age": Regression("age", "age", 1)}
    history = [_epoch(0.5, 0.5, "two"), _epoch(0.8, 0.53, "two")]  # 0.53 <= 0.5 + 0.1 * 0.5
    assert [name for name, *_ in at_chance(tasks, history)] == ["two"]
    history[1]["val"]["tasks"]["two"]["acc"] = 0.6
    assert at_chance(tasks, history) == []


def test_the_chance_warning_is_one_line_once_per_run_also_after_a_resume(capsys):
    trainer = SimpleNamespace(tasks=TEN, history=[_epoch(0.15, 0.10)])
    hook = ChanceWarningHook()
    hook.after_epoch(trainer, {"epoch": 1})
    for n in (2, 3):
        trainer.history.append(_epoch(0.3 * n, 0.1))
        hook.after_epoch(trainer, {"epoch": n})
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("warning: epoch 2: validation accuracy at chance while training accuracy climbs (label: ")
    resumed = ChanceWarningHook()
    resumed.on_resume(trainer)  # had warned at epoch 2: not again
    trainer.history.append(_epoch(0.95, 0.1))
    resumed.after_epoch(trainer, {"epoch": 4})
    fresh = ChanceWarningHook()
    fresh.on_resume(SimpleNamespace(tasks=TEN, history=trainer.history[:1]))
    assert capsys.readouterr().out == "" and resumed.warned and not fresh.warned
