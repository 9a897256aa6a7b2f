"""Multi-input multitask learning (``tasks.<t>.data``): the config and its refusals, one batch of every task per step
through its own head, the weighting paths against hand computations, per-task validation, exact resume, mtl eval,
and the shipped config on Fashion-MNIST with the captcha characters."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtl.build.experiment import _speed_up, build_experiment
from mtl.config.load import build_config, load_config, task_configs
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.hooks import UnfreezeHook
from mtl.engine.meter import MultiInputMeter
from mtl.engine.trainer import Trainer
from mtl.workflows.evaluate import eval_command
from mtl.workflows.train import resume_run, run

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = Path(__file__).parents[2] / "configs"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    return tmp_path_factory.mktemp("multi_input_data")


def raw_config(roots: Path, out: Path, **overrides) -> dict:
    """Two tasks of one small_cnn, each on its own generated data set: shapes (24 training images, 3 batches of 8)
    and captcha characters (20 training images, 5 batches of 4): an epoch is 5 steps, and shapes starts a second
    pass at step 4."""
    cfg = {
        "name": "multi",
        "out_dir": str(out),
        "data": {
            "image_size": 16,
            "resize_size": 16,
            "augment": "random_crop",
            "crop_padding": 2,
            "batch_size": 8,
            "num_workers": 0,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
        },
        "model": {"encoder": "small_cnn", "encoder_options": {"widths": [4, 8, 8, 16]}},
        "tasks": {
            "shape": {"data": {"name": "shapes", "root": str(roots), "options": {"per_class": 4, "val_per_class": 2}}},
            "char": {
                "data": {
                    "name": "captcha_chars",
                    "root": str(roots),
                    "options": {"charset": "0123", "per_class": 5, "val_per_class": 2, "size": 16},
                    "batch_size": 4,
                }
            },
        },
        "optim": {"name": "sgd", "lr": 0.05},
        "train": {"epochs": 2, "progress": False, "log_images": 0, "deterministic": True},
    }
    for key, value in overrides.items():
        node = cfg
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


def _trainer(exp, name: str = "equal") -> Trainer:
    return Trainer(
        exp.model,
        exp.tasks,
        exp.loaders,
        torch.optim.SGD(exp.model.parameters(), lr=0.0),
        epochs=1,
        device=exp.device,
        progress=False,
        weighting=exp.weighting,
        generator=exp.generator,
    )


def _first_batch(exp):
    exp.generator.manual_seed(0)
    return next(iter(exp.loaders["train"]))


# --------------------------------------------------------------------------- config


def test_task_data_inherits_the_top_level_data_but_not_another_data_sets_root_and_options(roots, tmp_path):
    raw = raw_config(roots, tmp_path, **{"data.name": "shapes", "data.options": {"per_class": 9}})
    raw["tasks"]["shape"]["data"] = {"options": {"val_per_class": 3}}  # the top level's data set
    configs = task_configs(build_config(raw))
    shape, char = configs["shape"].data, configs["char"].data
    assert (shape.name, shape.options, shape.batch_size, shape.image_size) == (
        "shapes",
        {"per_class": 9, "val_per_class": 3},  # merged key by key
        8,
        16,
    )
    assert (char.name, char.batch_size, char.image_size, char.augment) == ("captcha_chars", 4, 16, "random_crop")
    assert char.options == {"charset": "0123", "per_class": 5, "val_per_class": 2, "size": 16}  # none of shapes'
    assert list(configs["char"].tasks) == ["char"] and configs["char"].tasks["char"].data is None


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda r: r["tasks"].update(extra={}), "tasks.shape.data, tasks.char.data is set but tasks.extra.data is not"),
        (lambda r: r["tasks"]["char"]["data"].update(bach_size=4), "unknown config key 'tasks.char.data.bach_size'"),
        (lambda r: r["tasks"]["char"]["data"].update(val_split=2.0), "bad config value in tasks.char.data"),
        (lambda r: r.update(continual={"methods": ["finetune"]}), "it does not take tasks.<t>.data (multi-input)"),
    ],
    ids=["a-task-without-data", "unknown-key", "bad-value", "continual"],
)
def test_bad_multi_input_configs_are_refused_in_one_line(roots, tmp_path, change, words):
    raw = raw_config(roots, tmp_path)
    change(raw)
    with pytest.raises(UserError, match="^[^\n]*$") as e:
        build_config(raw)
    assert words in str(e.value)


def test_what_a_multi_input_run_cannot_do_is_refused_in_one_line(roots, tmp_path):
    representation = raw_config(roots, tmp_path, **{"weighting.name": "mgda", "weighting.grad_on": "representation"})
    with pytest.raises(UserError, match="grad_on=representation needs one shared representation.*grad_on=params$"):
        build_experiment(build_config(representation))
    one_test_split = raw_config(roots, tmp_path)
    one_test_split["tasks"]["char"]["data"].update(val_split=0.4, test_split="test")
    with pytest.raises(UserError, match="tasks char has a test split and the others' not; set data.test_split"):
        build_experiment(build_config(one_test_split))
    refused = {"sdmgrad": "takes several batches per step", "auto_lambda": "draws meta batches of all tasks at once"}
    for name, words in refused.items():
        with pytest.raises(UserError, match=f"^weighting {name} {words}, which multi-input runs .* do not support"):
            build_experiment(build_config(raw_config(roots, tmp_path, **{"weighting.name": name})))
    sizes = raw_config(roots, tmp_path, **{"model.arch": "mmoe"})
    sizes["tasks"]["char"]["data"].update(image_size=20, resize_size=20)
    with pytest.raises(UserError, match=r"differ in size \(shape 16x16, char 20x20\), but model.arch=mmoe"):
        build_experiment(build_config(sizes))
    frozen = {"train.cache_features": "on", "model.freeze": "all", "data.augment": "none"}  # cacheable if one input
    cfg = build_config(raw_config(roots, tmp_path, **frozen))
    with pytest.raises(UserError, match="cannot be cached: a multi-input run"):
        _speed_up(cfg, build_experiment(cfg))


# --------------------------------------------------------------------------- loaders and steps


def test_an_epoch_is_the_longest_loader_and_its_order_a_function_of_seed_and_epoch(roots, tmp_path):
    exp = build_experiment(build_config(raw_config(roots, tmp_path)))
    loader = exp.loaders["train"]
    assert len(loader) == 5 and [len(x) for x in loader.loaders.values()] == [3, 5]

    def epoch(seed):
        exp.generator.manual_seed(seed)
        return [{t: (b["image"], b["targets"][t]) for t, b in batch["inputs"].items()} for batch in loader]

    a, b, c = epoch(7), epoch(7), epoch(8)
    assert [len(batch["shape"][1]) for batch in a] == [8, 8, 8, 8, 8]  # shapes' second pass from step 4
    assert [len(batch["char"][1]) for batch in a] == [4] * 5
    first_pass = torch.cat([batch["shape"][1] for batch in a[:3]])
    assert sorted(first_pass.tolist()) == sorted([0, 1, 2, 3, 4, 5] * 4)  # every image once, then again
    for x, y in zip(a, b):
        assert all(torch.equal(x[t][0], y[t][0]) and torch.equal(x[t][1], y[t][1]) for t in x)
    assert not all(torch.equal(x["shape"][0], y["shape"][0]) for x, y in zip(a, c))
    assert not torch.equal(a[0]["shape"][0], a[3]["shape"][0])  # the second pass is shuffled anew


def test_a_step_encodes_each_tasks_own_batch_and_runs_only_that_tasks_head_on_it(roots, tmp_path):
    exp = build_experiment(build_config(raw_config(roots, tmp_path)))
    batch = _first_batch(exp)
    encoded, heads = [], {t: [] for t in exp.tasks}
    exp.model.encoder.register_forward_hook(lambda m, args, out: encoded.append((args[0], out["out"])))
    for t, head in exp.model.heads.items():
        head.register_forward_hook(lambda m, args, out, t=t: heads[t].append(args[0]))
    losses = _trainer(exp).step(batch, MultiInputMeter(exp.tasks, exp.device), True)
    assert set(losses) == {"shape", "char"}
    assert len(encoded) == 2
    for (x, features), t in zip(encoded, ["shape", "char"]):
        assert torch.equal(x, batch["inputs"][t]["image"])
        assert len(heads[t]) == 1 and heads[t][0] is features  # this task's head, on this task's images only


@pytest.mark.parametrize("arch", ["mtan", "mmoe"])
def test_an_architecture_trains_on_each_tasks_own_batch(roots, tmp_path, arch):
    exp = build_experiment(build_config(raw_config(roots, tmp_path, **{"model.arch": arch})))
    before = [p.detach().clone() for p in exp.model.parameters()]
    trainer = _trainer(exp)
    trainer.optimizer = torch.optim.SGD(exp.model.parameters(), lr=0.1)
    losses = trainer.step(_first_batch(exp), MultiInputMeter(exp.tasks, exp.device), True)
    assert all(torch.isfinite(v) for v in losses.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, exp.model.parameters()))
    assert set(trainer.run_phase("val")["tasks"]) == {"shape", "char"}


def _by_hand(model, batch):
    """Each task's cross-entropy on its own batch and its gradients w.r.t. every parameter, one backward each."""
    grads, losses = {}, {}
    for t, part in batch["inputs"].items():
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model.heads[t](model.encoder(part["image"])["out"]), part["targets"][t])
        loss.backward()
        losses[t] = loss.item()
        grads[t] = {n: torch.zeros_like(p) if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    return losses, grads


def test_equal_weighting_applies_the_sum_of_each_tasks_own_gradient(roots, tmp_path):
    exp = build_experiment(build_config(raw_config(roots, tmp_path)))
    batch = _first_batch(exp)
    reference = copy.deepcopy(exp.model).train()
    losses, grads = _by_hand(reference, batch)
    meter = MultiInputMeter(exp.tasks, exp.device)
    step = _trainer(exp).step(batch, meter, True)
    assert {t: v.item() for t, v in step.items()} == pytest.approx(losses, rel=1e-5)
    for name, p in exp.model.named_parameters():
        torch.testing.assert_close(p.grad, grads["shape"][name] + grads["char"][name], rtol=1e-4, atol=1e-6)
    assert meter.n == [8, 4]  # each task counts its own images
    assert meter.result()["tasks"]["char"]["loss"] == pytest.approx(losses["char"], rel=1e-5)


def test_mgda_combines_the_per_task_gradients_of_the_shared_encoder_by_their_min_norm_point(roots, tmp_path):
    exp = build_experiment(build_config(raw_config(roots, tmp_path, **{"weighting.name": "mgda"})))
    batch = _first_batch(exp)
    reference = copy.deepcopy(exp.model).train()
    _, grads = _by_hand(reference, batch)
    shared = [n for n, _ in exp.model.named_parameters() if n.startswith("encoder.")]
    g1, g2 = (torch.cat([grads[t][n].double().reshape(-1) for n in shared]) for t in ("shape", "char"))
    gamma = float(((g2 - g1) @ g2 / (g1 - g2).square().sum()).clamp(0, 1))  # Sener & Koltun, Alg. 1 for T = 2
    _trainer(exp).step(batch, MultiInputMeter(exp.tasks, exp.device), True)
    assert exp.weighting.last_weights.tolist() == pytest.approx([gamma, 1 - gamma], abs=1e-4)
    params = dict(exp.model.named_parameters())
    for name in shared:
        expected = gamma * grads["shape"][name] + (1 - gamma) * grads["char"][name]
        torch.testing.assert_close(params[name].grad, expected, rtol=1e-3, atol=1e-6)
    for t, w in (("shape", gamma), ("char", 1 - gamma)):  # each head: its own loss, weighted
        for name in (n for n in params if n.startswith(f"heads.{t}.")):
            torch.testing.assert_close(params[name].grad, w * grads[t][name], rtol=1e-3, atol=1e-6)


def test_validation_scores_every_task_on_its_own_split(roots, tmp_path):
    exp = build_experiment(build_config(raw_config(roots, tmp_path)))
    val = _trainer(exp).run_phase("val")
    assert set(val["tasks"]) == {"shape", "char"}
    model = exp.model.eval()
    for t, loader in exp.loaders["val"].loaders.items():
        with torch.no_grad():
            parts = [(model.heads[t](model.encoder(b["image"])["out"]), b["targets"][t]) for b in loader]
        logits, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        assert len(y) == {"shape": 12, "char": 8}[t]
        assert val["tasks"][t]["acc"] == pytest.approx((logits.argmax(1) == y).float().mean().item())
        assert val["tasks"][t]["loss"] == pytest.approx(F.cross_entropy(logits, y).item(), rel=1e-5)
    assert val["acc"] == pytest.approx((val["tasks"]["shape"]["acc"] + val["tasks"]["char"]["acc"]) / 2)
    assert val["loss"] == pytest.approx(val["tasks"]["shape"]["loss"] + val["tasks"]["char"]["loss"])


# --------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def whole_run(roots, tmp_path_factory):
    grid = {"train.log_images": 2}  # TensorBoard's grid: the first task's validation images
    return run(build_config(raw_config(roots, tmp_path_factory.mktemp("whole"), **grid)), quiet=True)


def test_a_run_interrupted_mid_epoch_resumes_to_the_uninterrupted_result(roots, tmp_path, monkeypatch, whole_run):
    def stop_at_step_4(self, trainer, losses):  # shapes is in its second pass: every loader's position counts
        if trainer.global_step == 4:
            trainer.request_stop()

    monkeypatch.setattr(UnfreezeHook, "after_step", stop_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        run(build_config(raw_config(roots, tmp_path, **{"train.log_images": 2})), quiet=True)
    monkeypatch.undo()
    (run_dir,) = (tmp_path / "multi").iterdir()
    partial = load_checkpoint(run_dir / "checkpoints" / "last.pt")["partial"]
    assert partial["step"] == 4 and partial["meter_n"] == [32, 16]
    resumed = resume_run(str(run_dir))
    for phase in ("train", "val"):
        assert resumed["final"][phase] == whole_run["final"][phase]
    a = load_checkpoint(Path(whole_run["run_dir"]) / "checkpoints" / "last.pt")["model"]
    b = load_checkpoint(run_dir / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_multi_input_run_reports_and_mtl_eval_scores_each_task_on_its_own_split(whole_run):
    assert whole_run["steps_per_epoch"] == 5 and whole_run["train_size"] == 24 + 20 and whole_run["val_size"] == 20
    assert {t: v["data"] for t, v in whole_run["inputs"].items()} == {"shape": "shapes", "char": "captcha_chars"}
    assert whole_run["classes"]["char"] == ["0", "1", "2", "3"]
    best = whole_run["best"]["val"]
    eval_command(whole_run["run_dir"], "val")
    metrics = json.loads((Path(whole_run["run_dir"]) / "eval" / "val" / "metrics.json").read_text())
    assert metrics["size"] == 20 and metrics["data_split"] == {"shape": "val", "char": "val"}
    for t in ("shape", "char"):
        assert metrics["tasks"][t]["acc"] == pytest.approx(best["tasks"][t]["acc"])
        assert metrics["tasks"][t]["loss"] == pytest.approx(best["tasks"][t]["loss"], rel=1e-5)


@pytest.mark.skipif(
    not FASHION_MNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist in /usr/share/datasets/fashion-mnist"
)
def test_the_shipped_config_trains_fashion_mnist_and_captcha_digits_as_two_tasks(tmp_path):
    overrides = [
        f"out_dir={tmp_path / 'runs'}",
        "train.epochs=1",
        "train.progress=false",
        "train.log_images=0",
        "data.val_split=0.002",  # 120 Fashion-MNIST images
        "data.test_split=null",
        "tasks.clothes.data.labels_per_class=2",
        f"tasks.digits.data.root={tmp_path / 'digits'}",
        "tasks.digits.data.options={charset: '0123', per_class: 10, val_per_class: 1, size: 28, seed: 0}",
        "tasks.digits.data.val_split=val",
        "data.batch_size=8",
        "model.encoder_options.widths=[4,8,8,16]",
    ]
    summary = run(build_config(*load_config(CONFIGS / "multi_input.yaml", overrides)), quiet=True)
    assert set(summary["final"]["val"]["tasks"]) == {"clothes", "digits"}
    assert summary["inputs"]["clothes"]["train_size"] == 20 and summary["inputs"]["digits"]["val_size"] == 4
    assert summary["steps_per_epoch"] == 5  # the digits' 40 images in batches of 8
