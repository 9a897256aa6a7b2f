"""Multitask end to end: the shipped configs on tiny generated data, every weighting through the trainer,
resume with weighting state, TensorBoard task weights, monitors, clean errors."""

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from mtl.build.experiment import build_experiment
from mtl.cli import main
from mtl.config.load import build_config, load_config
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.trainer import Hook, Trainer
from mtl.weighting import WEIGHTINGS
from mtl.workflows.train import resume_run, run

CONFIGS = Path(__file__).parents[2] / "configs"
GRADIENT = ("mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad")


def scenes_config(tmp_path: Path, *overrides: str, size: int = 32, n: int = 24):
    """configs/mtl_scenes.yaml shrunk to seconds: tiny scenes, a narrow encoder, two epochs."""
    base = [
        f"out_dir={tmp_path / 'runs'}",
        f"data.root={tmp_path / 'scenes'}",
        f"data.options={{size: {size}, train_size: {n}, val_size: 8, test_size: 8, seed: 0}}",
        "data.batch_size=8",
        "model.encoder_options.widths=[8,16,16,32]",
        "tasks.seg.head.options.channels=16",
        "tasks.depth.head.options.channels=16",
        "tasks.normal.head.options.channels=16",
        "train.epochs=2",
        "train.progress=false",
    ]
    return build_config(*load_config(CONFIGS / "mtl_scenes.yaml", base + list(overrides)))


def test_scenes_run_reports_every_task_and_logs_weights(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run(scenes_config(tmp_path, "weighting.name=dwa"), quiet=True)
    assert set(summary["tasks"]) == {"seg", "depth", "normal", "label"}
    # the shipped config selects on val and scores its own test scenes once, best epoch and last
    assert summary["protocol"] == {"select": "val", "val": "split val", "test": "test"}
    assert set(summary["test"]["best"]["tasks"]) == {"seg", "depth", "normal", "label"}
    assert 0 <= summary["test"]["best"]["tasks"]["seg"]["miou"] <= 1
    assert summary["tasks"]["depth"] == {
        "type": "depth",
        "primary": "abs_err",
        "directions": summary["tasks"]["depth"]["directions"],
    }
    val = summary["final"]["val"]["tasks"]
    assert 0 <= val["seg"]["miou"] <= 1 and 0 <= val["seg"]["pixel_acc"] <= 1
    assert val["depth"]["abs_err"] > 0 and val["depth"]["rel_err"] > 0
    assert 0 < val["normal"]["mean_angle"] < 180 and 0 <= val["normal"]["within_11.25"] <= 1
    assert 0 <= val["label"]["acc"] <= 1
    assert summary["weighting"] == "dwa"
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    assert set(lines[-1]["weights"]) == {"seg", "depth", "normal", "label"}
    assert sum(lines[-1]["weights"].values()) == pytest.approx(4.0, rel=1e-4)  # DWA weights sum to T
    acc = EventAccumulator(summary["run_dir"])
    acc.Reload()
    scalars = acc.Tags()["scalars"]
    for tag in [
        "weight/seg",
        "weight/label",
        "seg/miou/val",
        "depth/abs_err/val",
        "normal/mean_angle/train",
        "label/acc/val",
        "loss/train",
    ]:
        assert tag in scalars, tag
    assert [e.step for e in acc.Scalars("weight/seg")] == [1, 2]  # once per epoch, x = the epoch
    # the shipped config draws overlays of the dense tasks (the README promises them)
    assert {"val/overlay_seg", "val/overlay_depth", "val/overlay_normal"} <= set(acc.Tags()["images"])


def test_scenes_multitask_learns(tmp_path):
    summary = run(scenes_config(tmp_path, "train.epochs=4", n=64), quiet=True)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    first, last = lines[0]["train"]["tasks"], lines[-1]["train"]["tasks"]
    assert last["seg"]["loss"] < first["seg"]["loss"] and last["depth"]["loss"] < first["depth"]["loss"]
    assert last["normal"]["mean_angle"] < first["normal"]["mean_angle"]


def _one_epoch_of_sgd(exp, lr, hooks=()):
    """A trainer of one epoch of plain SGD over the model and the weighting's own parameters."""
    optimizer = torch.optim.SGD(list(exp.model.parameters()) + list(exp.weighting.parameters()), lr=lr)
    return Trainer(
        exp.model,
        exp.tasks,
        {"train": exp.loaders["train"]},
        optimizer,
        None,
        epochs=1,
        device=exp.device,
        progress=False,
        weighting=exp.weighting,
        hooks=hooks,
        grad_on=exp.cfg.weighting.grad_on,
    )


@pytest.mark.parametrize("name", sorted(WEIGHTINGS.names()))
def test_every_weighting_trains_through_the_trainer(tmp_path, name):
    """Contract: two training steps with each registered method leave finite, changed parameters (two batches; 2 x 3
    for MoDo and SDMGrad, which take three per step)."""
    method = WEIGHTINGS.get(name)
    grad_on = getattr(method, "grad_on_modes", ("params",))[0]  # graddrop: representation only
    n = 16 * method.samples
    cfg = scenes_config(tmp_path, f"weighting.name={name}", f"weighting.grad_on={grad_on}", n=n, size=16)
    exp = build_experiment(cfg)
    model = exp.model
    before = [p.detach().clone() for p in model.parameters()]
    history = _one_epoch_of_sgd(exp, lr=0.01).fit()
    assert math.isfinite(history[0]["train"]["loss"])
    after = list(model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "nothing was updated"
    assert torch.isfinite(exp.weighting.last_weights).all() and exp.weighting.last_weights.shape == (4,)
    encoder_moved = [not torch.equal(b, a) for b, a in zip(before, after)][: len(list(model.encoder.parameters()))]
    assert any(encoder_moved), "the shared encoder did not move"


@pytest.mark.parametrize("name", ["pcgrad", "mgda", "upgrad"])
def test_gradient_methods_on_the_shared_representation(tmp_path, name):
    summary = run(
        scenes_config(
            tmp_path, f"weighting.name={name}", "weighting.grad_on=representation", "train.epochs=1", n=16, size=16
        ),
        quiet=True,
    )
    assert math.isfinite(summary["final"]["train"]["loss"])


@pytest.mark.parametrize("grad_on", ["params", "representation"])
def test_imtl_learns_its_loss_scales_by_descent_on_the_scaled_losses(tmp_path, grad_on):
    """IMTL-L through the trainer: plain SGD moves s_t by -lr (e^{s_t} L_t - 1) at each step, L_t the step's loss."""
    cfg = scenes_config(tmp_path, "weighting.name=imtl", f"weighting.grad_on={grad_on}", n=16, size=16)
    exp = build_experiment(cfg)
    seen = []

    class Record(Hook):
        def after_step(self, trainer, losses):
            seen.append(torch.stack(list(losses.values())).double())

    lr = 0.05
    _one_epoch_of_sgd(exp, lr, hooks=[Record()]).fit()
    s = torch.zeros(4, dtype=torch.float64)
    for losses in seen:
        s = s - lr * (torch.exp(s) * losses - 1)
    assert len(seen) == 2 and torch.allclose(exp.weighting.log_scales.detach().double(), s, rtol=1e-5, atol=1e-7)


def test_representation_mode_with_equal_weights_matches_plain_backward(tmp_path):
    """grad_on=representation with a method that returns the plain sum (pcgrad on one task) must equal a
    normal backward: the encoder gets exactly the summed gradient."""
    cfg = scenes_config(
        tmp_path,
        "weighting.name=pcgrad",
        "weighting.grad_on=representation",
        "tasks.depth=null",
        "tasks.normal=null",
        "tasks.label=null",
        n=8,
        size=16,
    )
    exp = build_experiment(cfg)
    batch = next(iter(exp.loaders["train"]))
    grads = {}
    for mode in ("representation", "plain"):
        torch.manual_seed(0)
        model = exp.model
        model.train()
        for p in model.parameters():
            p.grad = None
        if mode == "plain":
            out = model(batch["image"])
            exp.tasks["seg"].loss(out["seg"], batch["targets"]["seg"]).backward()
        else:
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
            trainer = Trainer(
                model,
                exp.tasks,
                {},
                optimizer,
                None,
                epochs=1,
                device=exp.device,
                progress=False,
                weighting=exp.weighting,
                grad_on="representation",
            )
            from mtl.engine.trainer import _Meter

            trainer.step(batch, _Meter(exp.tasks, exp.device), train=True)
        grads[mode] = [p.grad.clone() for p in model.encoder.parameters()]
    for a, b in zip(grads["representation"], grads["plain"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_mtan_trains_and_its_parameters_belong_to_tasks(tmp_path):
    cfg = scenes_config(tmp_path, "model.arch=mtan", "weighting.name=pcgrad", "train.epochs=1", n=16, size=16)
    exp = build_experiment(cfg)
    owned = {id(p) for p in exp.model.task_parameters()}
    assert all(id(p) in owned for p in exp.model.mtan.parameters())
    assert not owned & {id(p) for p in exp.model.shared_parameters()}
    summary = run(cfg, quiet=True)
    assert math.isfinite(summary["final"]["val"]["loss"])
    assert set(summary["final"]["val"]["tasks"]) == {"seg", "depth", "normal", "label"}


ARCHS = ["cross_stitch", "mmoe", "cgc", "ple", "dselect_k", "ltb"]


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_trains_dense_and_pooled_heads_from_a_config(tmp_path, monkeypatch, arch):
    epochs = 2 if arch == "ltb" else 1
    cfg = scenes_config(tmp_path, f"model.arch={arch}", "weighting.name=mgda", f"train.epochs={epochs}", n=8, size=16)
    exp = build_experiment(cfg)
    shared, owned = list(exp.model.shared_parameters()), list(exp.model.task_parameters())
    assert {id(p) for p in shared}.isdisjoint(id(p) for p in owned)
    assert len(shared) + len(owned) == len(list(exp.model.parameters()))
    epochs_seen = []
    if arch == "ltb":  # its temperature follows the epoch: the trainer tells it each one
        original = type(exp.model.encoder).set_epoch
        monkeypatch.setattr(type(exp.model.encoder), "set_epoch", lambda m, e: (epochs_seen.append(e), original(m, e)))
    summary = run(cfg, quiet=True)
    assert summary["final"]["val"]["tasks"].keys() == {"seg", "depth", "normal", "label"}
    assert math.isfinite(summary["final"]["val"]["loss"])
    assert epochs_seen == ([0, 1] if arch == "ltb" else [])


@pytest.mark.parametrize("name", ["uncertainty", "famo"])
def test_resume_restores_weighting_state(tmp_path, monkeypatch, name):
    full = run(scenes_config(tmp_path / "a", f"weighting.name={name}", n=16, size=16), quiet=True)
    orig_fit = Trainer.fit

    def fit_one_epoch(self):  # the run is cut off after its first epoch
        self.epochs = 1
        return orig_fit(self)

    monkeypatch.setattr(Trainer, "fit", fit_one_epoch)
    part = run(scenes_config(tmp_path / "b", f"weighting.name={name}", n=16, size=16), quiet=True)
    monkeypatch.setattr(Trainer, "fit", orig_fit)
    assert part["epochs"] == 1
    resumed = resume_run(part["run_dir"])
    assert resumed["epochs"] == 2
    a = load_checkpoint(f"{full['run_dir']}/checkpoints/last.pt")
    b = load_checkpoint(f"{resumed['run_dir']}/checkpoints/last.pt")
    for key in a["weighting"]:
        if isinstance(a["weighting"][key], torch.Tensor):
            torch.testing.assert_close(a["weighting"][key], b["weighting"][key])
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], msg=key)


def test_single_task_baselines_compare_and_delta_m(tmp_path, capsys):
    seg = run(
        scenes_config(
            tmp_path,
            "name=seg_only",
            "tasks.depth=null",
            "tasks.normal=null",
            "tasks.label=null",
            "train.epochs=1",
            "data.test_split=null",  # Δm on validation, as train.baseline uses it
            n=16,
            size=16,
        ),
        quiet=True,
    )
    depth = run(
        scenes_config(
            tmp_path,
            "name=depth_only",
            "tasks.seg=null",
            "tasks.normal=null",
            "tasks.label=null",
            "train.epochs=1",
            "data.test_split=null",  # Δm on validation, as train.baseline uses it
            n=16,
            size=16,
        ),
        quiet=True,
    )
    baseline = tmp_path / "baseline.yaml"
    assert main(["compare", seg["run_dir"], depth["run_dir"], "--write-baseline", str(baseline)]) == 0
    base = load_config_file(baseline)
    assert base["seg"]["miou"] == pytest.approx(seg["final"]["val"]["tasks"]["seg"]["miou"])
    assert "loss" not in base["seg"] and "abs_err" in base["depth"]
    both = run(
        scenes_config(
            tmp_path,
            "name=both",
            "tasks.normal=null",
            "tasks.label=null",
            f"train.baseline={baseline}",
            "train.epochs=1",
            "data.test_split=null",  # Δm on validation, as train.baseline uses it
            n=16,
            size=16,
        ),
        quiet=True,
    )
    m, b = both["final"]["val"]["tasks"], base
    terms = [(m["seg"][k] - v) / v * (1 if k != "loss" else -1) for k, v in b["seg"].items()]
    terms += [-(m["depth"][k] - v) / v for k, v in b["depth"].items()]  # depth metrics are errors
    expected = 100 * sum(terms) / len(terms)
    assert both["final"]["val"]["delta_m"] == pytest.approx(expected, rel=1e-6)
    seg_terms = terms[: len(b["seg"])]
    libmtl = 100 * (sum(seg_terms) / len(seg_terms) + sum(terms[len(seg_terms) :]) / len(b["depth"])) / 2
    capsys.readouterr()
    assert main(["compare", seg["run_dir"], both["run_dir"], "--baseline", str(baseline)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[2].startswith("| group | n | seg.miou") and table[2].endswith("| Δm % (flat) | Δm % (LibMTL Δp) |")
    assert table[4].endswith("| n/a | n/a |")  # the single-task run lacks the depth baseline
    assert table[5].endswith(f"| {expected:+.2f} | {libmtl:+.2f} |")


def load_config_file(path):
    import yaml

    return yaml.safe_load(Path(path).read_text())


def test_monitor_picks_best_by_named_metric(tmp_path):
    summary = run(scenes_config(tmp_path, "train.monitor=depth.abs_err", "train.epochs=3", n=16, size=16), quiet=True)
    lines = [json.loads(x) for x in (Path(summary["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
    errors = [m["val"]["tasks"]["depth"]["abs_err"] for m in lines]
    assert summary["best"]["epoch"] == errors.index(min(errors)) + 1
    assert [m["score"] for m in lines] == pytest.approx([-e for e in errors])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.monitor=seg.bogus"], "not a task metric"),
        (["train.monitor=delta_m"], "needs train.baseline"),
        (["tasks.extra={target: nothing}"], "nothing"),
        (["tasks.seg.head=linear"], "needs a dense"),
        (["tasks.label.head=fpn"], "needs a pooled"),
        (["tasks.label.num_classes=5"], "num_classes is 5"),
        (["weighting.name=pcgrad", "model.freeze=all"], "loss-level weighting"),
        (["weighting.name=nope"], "nope"),
        (["weighting.name=cagrad", "weighting.options={bogus: 1}"], "bogus"),
        (["model.arch=cross"], "must be one of hard, mtan, cgc"),
        (["model.arch=ple", "weighting.name=mgda", "weighting.grad_on=representation"], "no representation"),
        (["model.arch=ple", "weighting.name=graddrop", "weighting.grad_on=representation"], "choose another model"),
        (["model.arch=mmoe", "model.freeze=all"], "same frozen encoder"),
        (["model.arch=mmoe", "model.arch_options={experts: 2}"], "known: num_experts"),
        (["model.arch_options={num_experts: 2}"], "remove it or set model.arch"),
        (["weighting.name=db_mtl", "weighting.grad_on=representation"], "set weighting.grad_on=params"),
        (["weighting.name=excess_mtl", "weighting.grad_on=representation"], "set weighting.grad_on=params"),
        (["weighting.name=graddrop"], "set weighting.grad_on=representation"),
        (["weighting.name=modo", "weighting.grad_on=representation"], "pairs the task gradients of 3 different"),
    ],
)
def test_bad_multitask_configs_fail_before_training(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        run(scenes_config(tmp_path, *overrides, n=8, size=16), quiet=True)
    assert not list((tmp_path / "runs").rglob("checkpoints")), "a bad config must not start training"


def test_cli_bad_multitask_config_exits_2(tmp_path, capsys):
    code = main(
        [
            "train",
            str(CONFIGS / "mtl_scenes.yaml"),
            f"out_dir={tmp_path}",
            f"data.root={tmp_path / 's'}",
            "data.options={size: 16, train_size: 8, val_size: 4}",
            "weighting.name=mgda",
            "model.freeze=all",
        ]
    )
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mgda" in err[0] and "Traceback" not in err[0]


def test_captcha_config_has_a_grid_head_per_character(tmp_path):
    pytest.importorskip("captcha")
    cfg = build_config(
        *load_config(
            CONFIGS / "captcha.yaml",
            [
                f"out_dir={tmp_path}",
                f"data.root={tmp_path / 'c'}",
                "data.options.train_size=16",
                "data.options.val_size=8",
                "model.encoder_options.widths=[8,8,16,16]",
                "train.epochs=1",
                "train.progress=false",
            ],
        )
    )
    exp = build_experiment(cfg)
    assert list(exp.tasks) == ["char0", "char1", "char2", "char3"]
    assert all(t.out_dim == 36 for t in exp.tasks.values())
    batch = next(iter(exp.loaders["train"]))
    assert batch["image"].shape[1:] == (3, 48, 128)
    out = exp.model(batch["image"])
    assert {k: v.shape[1] for k, v in out.items()} == {f"char{i}": 36 for i in range(4)}
    summary = run(cfg, quiet=True)
    assert math.isfinite(summary["final"]["val"]["loss"])


def test_multi_fashion_config_trains_on_idx_files(tmp_path):
    import numpy as np
    from test_data_multitask import write_idx

    root, rng = tmp_path / "fm", np.random.default_rng(0)
    root.mkdir()
    for prefix, n in (("train", 20), ("t10k", 10)):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(1, 256, (n, 28, 28)))
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    cfg = build_config(
        *load_config(
            CONFIGS / "multi_fashion.yaml",
            [
                f"out_dir={tmp_path}",
                f"data.root={root}",
                f"data.options={{train_size: 16, val_size: 8, cache_dir: {tmp_path / 'cache'}}}",
                "data.batch_size=8",
                "model.encoder_options.widths=[8,8,16,16]",
                "train.epochs=1",
                "train.progress=false",
                "weighting.name=mgda",
            ],
        )
    )
    summary = run(cfg, quiet=True)
    assert set(summary["final"]["val"]["tasks"]) == {"left", "right"}
    assert "acc" in summary["final"]["val"]  # both tasks are classifications: mean accuracy picks best


def test_nyuv2_config_builds_resnet50_aspp_on_npy_layout(tmp_path):
    from test_data_multitask import write_npy_layout

    root = write_npy_layout(tmp_path / "nyu", counts=(2, 2), h=32, w=48)
    cfg = build_config(
        *load_config(
            CONFIGS / "nyuv2.yaml",
            [
                f"out_dir={tmp_path}",
                f"data.root={root}",
                "model.weights=null",
                "data.batch_size=2",
                "data.num_workers=0",
                "train.epochs=1",
                "train.progress=false",
            ],
        )
    )
    exp = build_experiment(cfg)
    assert {t: type(h).__name__ for t, h in exp.model.heads.items()} == {
        t: "ASPPHead" for t in ("seg", "depth", "normal")
    }
    assert exp.model.encoder.feature_info[-1]["reduction"] == 8  # dilated: output stride 8
    batch = next(iter(exp.loaders["train"]))
    out = exp.model.eval()(batch["image"])
    assert (
        out["seg"].shape == (2, 13, 32, 48)
        and out["depth"].shape == (2, 1, 32, 48)
        and out["normal"].shape == (2, 3, 32, 48)
    )


@pytest.mark.parametrize("grad_on", ["params", "representation"])
def test_gradient_methods_give_heads_the_weighted_sum_gradient(tmp_path, grad_on):
    """Heads get d(sum_t w_t loss_t)/d(head) from the per-task pass itself, with w the method's task weights."""
    from mtl.engine.trainer import _Meter

    cfg = scenes_config(
        tmp_path, "weighting.name=mgda", f"weighting.grad_on={grad_on}", "tasks.normal=null", n=8, size=16
    )
    exp = build_experiment(cfg)
    batch = next(iter(exp.loaders["train"]))
    model = exp.model
    model.train()
    trainer = Trainer(
        model,
        exp.tasks,
        {},
        torch.optim.SGD(model.parameters(), lr=0.0),
        None,
        epochs=1,
        device=exp.device,
        progress=False,
        weighting=exp.weighting,
        grad_on=grad_on,
    )
    trainer.step(batch, _Meter(exp.tasks, exp.device), train=True)
    got = {n: p.grad.clone() for n, p in model.heads.named_parameters()}
    w = exp.weighting.last_weights.detach()
    assert not torch.allclose(w, w.mean().expand_as(w))  # unequal weights, so the check below means something
    for p in model.parameters():
        p.grad = None
    out = model(batch["image"])
    total = sum(w[i] * task.loss(out[t], batch["targets"][t]) for i, (t, task) in enumerate(exp.tasks.items()))
    total.backward()
    for n, p in model.heads.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_graddrop_through_the_trainer_masks_the_representation_gradients(tmp_path):
    """grad_on=representation: GradDrop gets each feature map (batch first, in the order of the gradients' columns),
    and its update is the per-position sign dropout of those gradients (checked against the per-position loop with
    the step's own draws); the encoder is trained with it."""
    from test_weighting_excess_graddrop import graddrop_reference

    from mtl.engine.trainer import _Meter

    cfg = scenes_config(
        tmp_path, "weighting.name=graddrop", "weighting.grad_on=representation", "tasks.normal=null", n=8, size=16
    )
    exp = build_experiment(cfg)
    method, seen = exp.weighting, {}
    forward = method.forward

    def spy(grads, losses):
        seen["grads"], seen["representation"] = grads.clone(), list(method.representation)
        seen["d"], w = forward(grads, losses)
        return seen["d"], w

    method.forward = spy
    model = exp.model
    model.train()
    trainer = Trainer(
        model,
        exp.tasks,
        {},
        torch.optim.SGD(model.parameters(), lr=0.0),
        None,
        epochs=1,
        device=exp.device,
        progress=False,
        weighting=method,
        grad_on="representation",
    )
    batch = next(iter(exp.loaders["train"]))
    trainer.step(batch, _Meter(exp.tasks, exp.device), train=True)
    representation = seen["representation"]
    assert all(a.shape[0] == len(batch["image"]) for a in representation)
    assert sum(a.numel() for a in representation) == seen["grads"].shape[1]
    fresh = WEIGHTINGS.get("graddrop")(list(exp.tasks))
    fresh.seed = method.seed
    generator = fresh.generator()  # the step's draw: the first
    draws = [torch.rand(a[0].numel(), generator=generator).tolist() for a in representation]
    expected = graddrop_reference(seen["grads"], representation, draws)
    torch.testing.assert_close(seen["d"].double(), expected, rtol=1e-5, atol=1e-7)
    assert not torch.allclose(seen["d"], seen["grads"].sum(0))  # signs were dropped
    assert all(p.grad is not None for p in model.encoder.parameters())


def test_a_three_batch_step_balances_each_batchs_task_gradients_and_trains_the_heads_on_the_last(tmp_path):
    """SDMGrad's step through the trainer: the weighting gets the (3, T, D) task gradients of three batches, the
    shared parameters get its d and the heads the gradient of sum_t w_t L_t on the third batch; an epoch of 7 batches
    is 2 steps (the 7th batch is left out) and every batch of a step is counted; 2 batches cannot make a step."""
    import copy

    from mtl.engine.meter import Meter

    exp = build_experiment(scenes_config(tmp_path, "weighting.name=sdmgrad", "data.batch_size=4", n=28, size=16))
    model, batches = exp.model, list(exp.loaders["train"])
    trainer = _one_epoch_of_sgd(exp, lr=0.0)
    before = copy.deepcopy(exp.weighting)
    model.train()
    meter = Meter(exp.tasks, exp.device)
    trainer._samples_step(batches[:3], meter)
    assert meter.n == sum(len(b["image"]) for b in batches[:3]) and trainer.global_step == 1
    shared, heads = list(model.shared_parameters()), list(model.heads.parameters())
    rows, losses = [], []
    for batch in batches[:3]:
        out = model(batch["image"])
        each = [task.loss(out[t], batch["targets"][t]) for t, task in exp.tasks.items()]
        rows.append(
            torch.stack(
                [torch.cat([g.reshape(-1) for g in torch.autograd.grad(x, shared, retain_graph=True)]) for x in each]
            )
        )
        losses.append(each)
    d, w = before(torch.stack(rows), torch.stack([torch.stack(x).detach() for x in losses]))
    assert torch.allclose(w, exp.weighting.last_weights)
    got = torch.cat([p.grad.reshape(-1) for p in shared])
    torch.testing.assert_close(got, d, rtol=1e-4, atol=1e-6)
    expected = torch.autograd.grad(sum(w[i] * x for i, x in enumerate(losses[-1])), heads, allow_unused=True)
    for p, g in zip(heads, expected):
        torch.testing.assert_close(p.grad, g if g is not None else None, rtol=1e-4, atol=1e-6)

    seen = []
    exp.weighting.register_forward_hook(lambda module, args, result: seen.append(tuple(args[0].shape[:2])))
    trainer.global_step = 0
    trainer.fit()
    assert trainer.global_step == 2 and seen == [(3, 4), (3, 4)]
    assert trainer.history[0]["train"]["tasks"]["seg"]["loss"] > 0

    small = build_experiment(scenes_config(tmp_path / "small", "weighting.name=sdmgrad", n=16, size=16))
    with pytest.raises(UserError, match="takes 3 batches per step, but the training data gives 2 per epoch"):
        _one_epoch_of_sgd(small, lr=0.01).fit()


def test_a_three_batch_method_resumes_mid_epoch_exactly(tmp_path, monkeypatch):
    """MoDo on 7 batches an epoch (2 steps of 3, the 7th left out), stopped after its first step: the checkpoint
    counts the 3 batches taken, and the resumed run ends exactly where the uninterrupted one does."""
    from mtl.engine.hooks import UnfreezeHook

    def config(out):
        options = ("weighting.name=modo", "weighting.options={gamma: 0.5}", "data.batch_size=4", "train.epochs=1")
        return scenes_config(out, *options, "train.log_images=0", "data.test_split=null", n=28, size=16)

    whole = run(config(tmp_path / "a"), quiet=True)
    assert whole["steps_per_epoch"] == 2

    def stop_after_the_first_step(self, trainer, losses):
        trainer.request_stop()

    monkeypatch.setattr(UnfreezeHook, "after_step", stop_after_the_first_step)
    with pytest.raises(KeyboardInterrupt):
        run(config(tmp_path / "b"), quiet=True)
    monkeypatch.undo()
    (run_dir,) = [p for p in (tmp_path / "b" / "runs").glob("*/*") if p.is_dir()]
    state = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert state["epoch"] == 0 and state["partial"]["step"] == 3 and state["global_step"] == 1
    resumed = resume_run(str(run_dir))
    assert resumed["epochs"] == 1
    for phase in ("train", "val"):
        assert resumed["final"][phase] == whole["final"][phase]
    a = load_checkpoint(Path(whole["run_dir"]) / "checkpoints" / "last.pt")
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["weighting"]["lam"], b["weighting"]["lam"])
    assert not torch.equal(a["weighting"]["lam"], torch.full((4,), 0.25))  # lambda moved


# --------------------------------------------------------------------------- bilevel weighting (auto_lambda)


class _NoisyItems(torch.utils.data.Dataset):
    """12 fixed items with noise drawn from the global generator at each read, as per-item augmentation draws."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x, self.a = torch.randn(12, 6, generator=g), torch.randint(0, 3, (12,), generator=g)
        self.b = torch.randn(12, generator=g)

    def __len__(self):
        return 12

    def __getitem__(self, i):
        return {"image": self.x[i] + 0.1 * torch.randn(6), "a": self.a[i], "b": self.b[i]}


class _TinyMultitask(torch.nn.Module):
    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.encoder = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.2))
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 3), "b": nn.Linear(8, 1)})

    def forward(self, x):
        h = self.encoder(x)
        return {t: head(h) for t, head in self.heads.items()}

    def shared_parameters(self):
        return self.encoder.parameters()

    def task_parameters(self):
        return self.heads.parameters()


def _auto_lambda_trainer(hooks=(), epochs=2):
    """3 steps an epoch of SGD with momentum; auto_lambda with a large meta lr, so that the weights move."""
    from mtl.data.loaders import collate_targets
    from mtl.tasks.classification import Classification
    from mtl.tasks.regression import Regression
    from mtl.weighting import build_weighting

    torch.manual_seed(0)
    model = _TinyMultitask()
    tasks = {"a": Classification("a", "a", 3), "b": Regression("b", "b", 1)}
    generator = torch.Generator()
    loader = torch.utils.data.DataLoader(
        _NoisyItems(), batch_size=4, shuffle=True, generator=generator, collate_fn=collate_targets({"a": "a", "b": "b"})
    )
    return Trainer(
        model,
        tasks,
        {"train": loader},
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3),
        None,
        epochs=epochs,
        device=torch.device("cpu"),
        progress=False,
        generator=generator,
        seed=3,
        weighting=build_weighting("auto_lambda", list(tasks), lr=0.01),
        hooks=hooks,
    )


@pytest.mark.usefixtures("one_thread")
def test_auto_lambda_meta_steps_leave_batchnorm_statistics_and_draw_other_training_batches(monkeypatch):
    from mtl.weighting.loss import AutoLambda

    seen = []
    original = AutoLambda.meta_step

    def meta_step(self, problem):
        buffers = [b.clone() for b in problem.model.buffers()]
        original(self, problem)
        assert all(torch.equal(a, b) for a, b in zip(buffers, problem.model.buffers()))
        seen.append((problem.batches["train"][0].clone(), problem.batches["meta"][0].clone()))

    monkeypatch.setattr(AutoLambda, "meta_step", meta_step)
    trainer = _auto_lambda_trainer(epochs=1)
    running = trainer.model.encoder[1].running_mean.clone()
    trainer.fit()
    assert len(seen) == 3 and trainer.global_step == 3
    assert not torch.equal(trainer.model.encoder[1].running_mean, running)  # the steps themselves do move them
    assert not torch.allclose(trainer.weighting.loss_weights, torch.full((2,), 0.1))
    assert all(train.shape == meta.shape and not torch.allclose(train, meta) for train, meta in seen)
    items = _NoisyItems().x
    for _, meta in seen:  # training items (within their noise), none from another split
        assert ((meta[:, None] - items[None]).abs().amax(-1).amin(1) < 0.6).all()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("stop_at", [2, 4])  # in the first epoch; in the second, after a checkpointed epoch end
def test_auto_lambda_resumes_mid_epoch_exactly(stop_at):
    whole = _auto_lambda_trainer()
    whole.fit()

    class StopAt(Hook):
        def after_step(self, trainer, losses):
            if trainer.global_step == stop_at:
                trainer.request_stop()

        def on_interrupt(self, trainer, state):
            saved.update(copy.deepcopy(state))

    saved = {}
    with pytest.raises(KeyboardInterrupt):
        _auto_lambda_trainer(hooks=[StopAt()]).fit()
    in_epoch = (stop_at - 1) % 3 + 1
    assert saved["partial"]["step"] == in_epoch
    assert saved["meta_batches"] == {"epoch": (stop_at - 1) // 3, "position": in_epoch}
    resumed = _auto_lambda_trainer()
    resumed.load_state_dict(saved)
    resumed.fit()
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    for key, value in whole.weighting.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.weighting.state_dict()[key]), key
