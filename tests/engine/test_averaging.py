"""train.ema and train.swa: the EMA rule, SWA's mean, learning rate and BatchNorm recompute against independent
computations, and through real runs (files, selection, skipped steps, cached features, exact resume mid-epoch)."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import make_folder, tiny_config
from torch import nn

from mtl.config.load import build_config
from mtl.config.schema import SchedCfg
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.averaging import WeightEMA, recompute_bn, use_swa_lr
from mtl.engine.hooks import HOOKS, UnfreezeHook
from mtl.engine.optim import build_scheduler
from mtl.engine.trainer import Hook
from mtl.tasks.classification import Classification
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")


def _timm_decay(n, decay, warmup):
    """timm ModelEmaV3.get_decay(step=n) with update_after_step 0, min_decay 0, gamma 1, power 2/3."""
    s = max(0, n - 1)
    if s <= 0:
        return 0.0
    return max(min(1 - (1 + s) ** (-2 / 3), decay), 0.0) if warmup else decay


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_follows_the_rule_in_a_float64_hand_loop(warmup):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    model[0].bias.requires_grad_(False)  # frozen: stays as it is
    ema = WeightEMA(model, decay=0.6, warmup=warmup)
    names = [k for k, v in model.state_dict().items() if v.is_floating_point() and k != "0.bias"]
    shadow = {k: v.double().clone() for k, v in model.state_dict().items()}
    bias = model[0].bias.detach().clone()
    for n in range(1, 7):
        with torch.no_grad():  # what an update and a forward pass would have left
            for k in names:
                model.state_dict()[k].copy_(torch.randn_like(model.state_dict()[k]))
            model[1].num_batches_tracked.fill_(10 * n)
        ema.update(model)
        d = _timm_decay(n, 0.6, warmup)
        for k in names:
            shadow[k] = d * shadow[k] + (1 - d) * model.state_dict()[k].double()
        got = ema.module.state_dict()
        for k in names:
            assert torch.allclose(got[k].double(), shadow[k], atol=1e-6), (n, k)
        assert torch.equal(got["0.bias"], bias) and got["1.num_batches_tracked"].item() == 10 * n
    assert ema.updates == 6 and not any(p.requires_grad for p in ema.module.parameters())


class _Net(nn.Module):
    """conv-BN-conv-BN with a frozen BatchNorm in between that stays in eval mode when training (as mtl's
    models keep frozen parts)."""

    def __init__(self):
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
        self.frozen = nn.BatchNorm2d(4)
        self.b, self.bn_b = nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5)
        for p in self.frozen.parameters():
            p.requires_grad_(False)

    def train(self, mode=True):
        super().train(mode)
        self.frozen.eval()
        return self

    def forward(self, x):
        return self.bn_b(self.b(torch.relu(self.frozen(self.bn_a(self.a(x))))))


def test_bn_recompute_equals_the_cumulative_batch_statistics():
    torch.manual_seed(1)
    trained = _Net()
    with torch.no_grad():
        trained.frozen.running_mean.uniform_(-1, 1)
        trained.frozen.running_var.uniform_(0.5, 2)
    averaged = copy.deepcopy(trained).eval()
    batches = [{"image": torch.randn(b, 3, 6, 6) * 2 + 1} for b in (5, 3, 4)]
    frozen_stats = averaged.frozen.running_mean.clone(), averaged.frozen.running_var.clone()

    # directly: each BatchNorm's inputs in a float64 training-mode pass, the mean over batches of their
    # per-channel mean and unbiased variance
    direct, seen = copy.deepcopy(averaged).double().train(), {"bn_a": [], "bn_b": []}
    for name in seen:
        getattr(direct, name).register_forward_pre_hook(lambda m, args, name=name: seen[name].append(args[0]))
    with torch.no_grad():
        for batch in batches:
            direct(batch["image"].double())
    n = recompute_bn(averaged, trained, batches, lambda model, batch: model(batch["image"]))
    assert n == 3 and not averaged.training and averaged.bn_a.momentum == 0.1
    for name, inputs in seen.items():
        mean = torch.stack([x.mean((0, 2, 3)) for x in inputs]).mean(0)
        var = torch.stack([x.var((0, 2, 3), unbiased=True) for x in inputs]).mean(0)
        layer = getattr(averaged, name)
        assert torch.allclose(layer.running_mean.double(), mean, atol=1e-5), name
        assert torch.allclose(layer.running_var.double(), var, rtol=1e-5), name
    assert torch.equal(averaged.frozen.running_mean, frozen_stats[0])  # frozen: kept
    assert torch.equal(averaged.frozen.running_var, frozen_stats[1])


def test_swa_lr_is_torchs_swalr_from_the_start_step():
    def groups():
        w = [nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))]
        return torch.optim.SGD([{"params": [w[0]], "lr": 0.1}, {"params": [w[1]], "lr": 0.01}], lr=0.1)

    cfg, steps, start, anneal = SchedCfg(name="cosine"), 4, 6, 5  # start in epoch 2 of 4, 5 steps of annealing
    mine = groups()
    scheduler = build_scheduler(mine, cfg, 4, steps)
    use_swa_lr(scheduler, start, anneal, 0.5)  # swa.lr = 0.05 with optim.lr = 0.1
    ref = groups()
    ref_schedule = build_scheduler(ref, cfg, 4, steps)
    swalr = None
    for step in range(16):
        if step == start:  # torch's SWALR takes over from the lr the schedule gives there
            swalr = torch.optim.swa_utils.SWALR(ref, swa_lr=[0.05, 0.005], anneal_epochs=anneal)
        expected = [g["lr"] for g in ref.param_groups]
        assert [g["lr"] for g in mine.param_groups] == pytest.approx(expected, rel=1e-9), step
        mine.step(), ref.step()  # (no gradients: nothing moves)
        scheduler.step()
        (swalr or ref_schedule).step()
    assert [g["lr"] for g in mine.param_groups] == pytest.approx([0.05, 0.005])


@pytest.fixture
def small_folder(tmp_path):
    return make_folder(tmp_path / "colors", per_class=(8, 4), size=16)


def _config(folder, out, **extra):
    raw = tiny_config(folder, out, **{"data.image_size": 16, "data.resize_size": 16, "train.log_images": 0})
    raw["model"]["encoder_options"] = {"widths": [4, 8]}
    for key, value in extra.items():
        node, (*parents, last) = raw, key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return raw


def _poison_step(monkeypatch, step):
    """The training loss call number ``step`` gets a nan gradient (its value stays finite)."""
    original, calls = Classification.loss, {"n": 0}

    def loss(self, pred, target):
        value = original(self, pred, target)
        if pred.requires_grad:
            calls["n"] += 1
            if calls["n"] == step:
                value = value + 0.0 * (pred.sum() * 0.0).sqrt()
        return value

    monkeypatch.setattr(Classification, "loss", loss)


def test_an_ema_run_selects_on_the_ema_weights_and_best_pt_holds_them(small_folder, tmp_path, monkeypatch):
    raw = _config(small_folder, tmp_path / "runs", **{"train.epochs": 2, "train.ema": {"decay": 0.8}})
    raw["train"].update(nonfinite="skip", monitor="loss")
    other = make_folder(tmp_path / "other", per_class=(0, 4), size=16, seed=1)
    shutil.copytree(other / "val", small_folder / "test")
    raw["data"]["test_split"] = "test"
    _poison_step(monkeypatch, 2)
    summary = run(build_config(raw), quiet=True)
    d = Path(summary["run_dir"])
    lines = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert all(m["score"] == -m["val_ema"]["loss"] for m in lines)  # the EMA metrics select
    scores = [m["score"] for m in lines]
    assert summary["best"]["epoch"] == scores.index(max(scores)) + 1 and "val_ema" in summary["best"]
    assert "val_ema.tasks.label.acc" in (d / "metrics.csv").read_text().splitlines()[0]
    best, last = load_checkpoint(d / "checkpoints" / "best.pt"), load_checkpoint(d / "checkpoints" / "last.pt")
    assert best["model"].keys() == best["model_raw"].keys() == last["model"].keys()
    # the skipped step moved nothing: one EMA update per optimizer update
    assert summary["skipped_steps"] == 1 and last["ema"]["updates"] == last["global_step"] == 2 * 3 - 1
    if summary["best"]["epoch"] == 2:
        assert all(torch.equal(best["model"][k], last["ema"]["model"][k]) for k in best["model"])
        assert all(torch.equal(best["model_raw"][k], last["model"][k]) for k in best["model"])
        assert summary["test"]["best"] == summary["test"]["last"]  # both the final EMA weights
    weights = [k for k in best["model"] if k.endswith("weight")]
    assert any(not torch.equal(best["model"][k], best["model_raw"][k]) for k in weights)


def test_ema_of_heads_on_cached_features(small_folder, tmp_path):
    raw = _config(small_folder, tmp_path / "runs", **{"train.epochs": 1, "train.ema": {"decay": 0.5}})
    raw["model"]["freeze"], raw["data"]["augment"] = "all", "none"
    summary = run(build_config(raw), quiet=True)
    assert "features cached" in summary["pipeline"]
    last = load_checkpoint(Path(summary["run_dir"]) / "checkpoints" / "last.pt")
    ema = last["ema"]["model"]
    assert ema.keys() == last["model"].keys()
    assert all(torch.equal(ema[k], last["model"][k]) for k in ema if k.startswith("encoder."))  # frozen
    heads = [k for k in ema if k.startswith("heads.") and k.endswith("weight")]
    assert heads and all(not torch.equal(ema[k], last["model"][k]) for k in heads)


class _Weights(Hook):
    """The trained weights at the end of every epoch."""

    seen: list = []

    def after_epoch(self, trainer, metrics):
        _Weights.seen.append({k: v.detach().double().clone() for k, v in trainer.model.named_parameters()})


def test_swa_is_the_mean_of_the_epoch_weights_with_bn_recomputed(small_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(HOOKS._entries, "weights", _Weights)
    monkeypatch.setattr(_Weights, "seen", [])
    raw = _config(small_folder, tmp_path / "runs", **{"train.epochs": 3, "train.monitor": "loss"})
    raw["train"].update(swa={"start_epoch": 1, "lr": 0.005}, hooks=["weights"])
    raw["model"]["freeze"] = {"until": "stage2"}  # stage1 stays frozen; stage2 joins at the second epoch
    raw["train"]["unfreeze"] = [{"epoch": 1, "modules": ["stage2"]}]
    raw["model"]["encoder_options"] = {"widths": [4, 8, 8]}
    summary = run(build_config(raw), quiet=True)
    folder = Path(summary["run_dir"]) / "checkpoints"
    swa, last = load_checkpoint(folder / "swa.pt"), load_checkpoint(folder / "last.pt")
    assert summary["swa"]["epochs"] == [2, 3] and swa["swa"]["epochs"] == [2, 3]
    assert int(last["swa"]["averaged"]["n_averaged"]) == 2
    for name in _Weights.seen[0]:
        mean = (_Weights.seen[1][name] + _Weights.seen[2][name]) / 2
        assert torch.allclose(swa["model"][name].double(), mean, atol=1e-7), name
    bn = "encoder.stage2.0.1"
    assert not torch.equal(swa["model"][f"{bn}.running_var"], last["model"][f"{bn}.running_var"])  # recomputed
    for k in swa["model"]:
        if k.startswith("encoder.stage1."):  # frozen all along: weights and statistics as trained
            assert torch.equal(swa["model"][k], last["model"][k]), k
    assert summary["swa"]["delivered"] == (summary["swa"]["score"] > -summary["best"]["val"]["loss"])
    best = load_checkpoint(folder / "best.pt")
    assert all(torch.equal(best["model"][k], swa["model"][k]) for k in swa["model"]) == summary["swa"]["delivered"]
    assert last["optimizer"]["param_groups"][0]["lr"] == pytest.approx(0.005)  # annealed to swa.lr


@pytest.mark.parametrize("average", [{"ema": {"decay": 0.7, "warmup": True}}, {"swa": {"start_epoch": 0}}])
def test_a_run_stopped_mid_epoch_resumes_to_the_same_average(small_folder, tmp_path, monkeypatch, average):
    def config(out):
        return build_config(
            _config(
                small_folder,
                out,
                **{"train.epochs": 2, "train.deterministic": True},
                **{f"train.{k}": v for k, v in average.items()},
            )
        )

    whole = run(config(tmp_path / "a"), quiet=True)

    def stop_in_the_second_epoch(self, trainer, losses):
        if trainer.global_step == 4:
            trainer.request_stop()

    monkeypatch.setattr(UnfreezeHook, "after_step", stop_in_the_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b"), quiet=True)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "b" / "tiny").iterdir()
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["partial"]["step"] == 1
    resumed = resume_run(str(run_dir))
    a = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    name = next(iter(average))
    for k, v in a[name].items():
        if isinstance(v, dict):
            assert all(torch.equal(v[j], b[name][k][j]) for j in v), k
        else:
            assert v == b[name][k], k
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.get("swa") == whole.get("swa") and resumed["best"] == whole["best"]


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"train": {"ema": {}, "swa": {"start_epoch": 0}}}, "train.ema and train.swa both average the weights"),
        ({"train": {"epochs": 3, "swa": {"start_epoch": 3}}}, "train.swa.start_epoch is 3 but the run has 3 epochs"),
        ({"train": {"ema": {"decay": 1}}}, "train.ema.decay"),
        ({"train": {"swa": {"start_epoch": 0, "lr": 0}}}, "train.swa.lr"),
        ({"train": {"ema": {}}, "continual": {"methods": ["finetune"]}}, "not supported in continual runs"),
    ],
)
def test_bad_averaging_keys_are_one_line(raw, message):
    with pytest.raises(UserError, match=message) as info:
        build_config(raw)
    assert "\n" not in str(info.value)
