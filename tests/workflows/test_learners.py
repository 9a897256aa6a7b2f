"""The learner registry, the continual scenarios (task, class, domain) and the trainer's step extension."""

import json

import pytest
import torch
import torch.nn.functional as F
from test_continual import CONFIGS, tiny
from torch import nn

from mtl.cli import main
from mtl.config.schema import CONTINUAL_METHODS
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.extension import StepExtension
from mtl.engine.meter import Meter
from mtl.engine.trainer import Trainer
from mtl.plugins import HOOKS, Hook
from mtl.tasks.classification import Classification
from mtl.workflows.learners import LEARNERS, ClassIncrementalTask, ConcatHeads
from mtl.workflows.stages import train_from_file


def test_the_built_in_learners_are_the_registered_ones():
    assert set(CONTINUAL_METHODS) == set(LEARNERS.names())


def test_a_class_incremental_task_scores_over_the_whole_head():
    """Task j's local labels are classes offset.. of the one head: the loss and accuracy are over every class."""
    torch.manual_seed(0)
    task = ClassIncrementalTask(Classification("t", "t", 2), offset=3)
    pred, target = torch.randn(6, 5), torch.tensor([0, 1, 1, 0, 1, 0])
    assert torch.allclose(task.loss(pred, target), F.cross_entropy(pred, target + 3))
    state = task.update(task.init_state(), pred, target)
    expected = (pred.argmax(1) == target + 3).double().mean().item()
    assert task.compute(state)["acc"] == pytest.approx(expected)
    assert task.metric_directions == {"loss": False, "acc": True}  # the rest is the wrapped task's


def test_concatenated_heads_put_each_tasks_classes_at_its_offset():
    a, b = nn.Linear(4, 2), nn.Linear(4, 3)
    x = torch.randn(5, 4)
    out = ConcatHeads([a, b])(x)
    assert out.shape == (5, 5)
    assert torch.equal(out[:, :2], a(x)) and torch.equal(out[:, 2:], b(x))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(3, 2)

    def forward(self, x, tasks=None):
        return {"t": self.layer(x)}

    def shared_parameters(self):
        return list(self.parameters())


class Recording(StepExtension):
    """Adds c * ||w||^2, scales the gradients by 2 before the update, counts the updates it saw."""

    def __init__(self, c):
        self.c, self.updates, self.generator = c, 0, torch.Generator().manual_seed(0)

    def extra_loss(self, model, x, targets, outputs):
        torch.rand(1, generator=self.generator)
        return self.c * model.layer.weight.pow(2).sum()

    def before_update(self, model):
        for p in model.parameters():
            p.grad.mul_(2)

    def after_update(self, model, x, targets, outputs):
        self.updates += 1

    def state_dict(self):
        return {"updates": self.updates, "rng": self.generator.get_state()}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        self.generator.set_state(state["rng"])


def _trainer(model, extension, lr=0.1, **kw):
    tasks = {"t": Classification("t", "t", 2)}
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return Trainer(model, tasks, {}, opt, extension=extension, epochs=1, device=torch.device("cpu"), **kw)


def test_the_step_extension_adds_its_loss_changes_the_gradients_and_sees_each_update():
    """One SGD step with the extension equals the hand-computed step: w - lr * 2 * (dCE/dw + 2 c w)."""
    torch.manual_seed(0)
    model, c, lr = Tiny(), 0.3, 0.1
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 1, 0])
    w0, b0 = model.layer.weight.detach().clone(), model.layer.bias.detach().clone()
    ref_w, ref_b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
    loss = F.cross_entropy(x @ ref_w.T + ref_b, y) + c * ref_w.pow(2).sum()
    gw, gb = torch.autograd.grad(loss, (ref_w, ref_b))
    ext = Recording(c)
    trainer = _trainer(model, ext, lr=lr)
    trainer.step({"image": x, "targets": {"t": y}}, Meter(trainer.tasks, torch.device("cpu")), True)
    assert torch.allclose(model.layer.weight, w0 - lr * 2 * gw, atol=1e-6)
    assert torch.allclose(model.layer.bias, b0 - lr * 2 * gb, atol=1e-6)
    assert ext.updates == 1
    state = trainer.state_dict()
    assert state["extension"]["updates"] == 1
    other = _trainer(Tiny(), Recording(c))
    other.load_state_dict(state)
    assert other.extension.updates == 1 and torch.equal(
        other.extension.generator.get_state(), ext.generator.get_state()
    )


def test_a_skipped_step_leaves_the_extension_as_it_was():
    model, ext = Tiny(), Recording(0.1)
    trainer = _trainer(model, ext, nonfinite="skip")
    before = ext.generator.get_state()
    x = torch.full((2, 3), float("nan"))
    trainer.step({"image": x, "targets": {"t": torch.tensor([0, 1])}}, Meter(trainer.tasks, torch.device("cpu")), True)
    assert ext.updates == 0 and trainer.skipped_steps == 1
    assert torch.equal(ext.generator.get_state(), before)  # its draw is drawn again by the next step


def test_an_extension_with_a_gradient_method_is_refused():
    from mtl.weighting import build_weighting

    with pytest.raises(UserError, match="loss-level weightings only"):
        _trainer(Tiny(), Recording(0.1), weighting=build_weighting("mgda", ["t"]))


@pytest.mark.parametrize("scenario", ["class", "domain"])
def test_finetune_runs_the_class_and_domain_scenarios(tmp_path, scenario):
    """Class-incremental: one head over the 26 classes seen, each task scored over all of them; domain-incremental
    (here the same two classes in both stages): one head for every task."""
    pytest.importorskip("captcha")
    stages = (
        "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3, 4]}}]"
        if scenario == "class"
        else "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3]}}]"
    )
    (summary,) = train_from_file(
        str(CONFIGS / "progressive.yaml"),
        tiny(
            tmp_path,
            "continual.methods=[finetune,head_only]",
            f"continual.scenario={scenario}",
            stages,
            "train.epochs=1",
        ),
    )
    from mtl.core.checkpoint import load_checkpoint

    r = summary["methods"]["finetune"]
    assert [len(row) for row in r["R"]] == [1, 2]

    root = tmp_path / "runs"
    (run,) = [p for p in root.rglob("finetune/b/checkpoints/best.pt")]
    weights = load_checkpoint(run)["model"]
    if scenario == "class":
        assert any(k.startswith("heads.b.parts.0.") for k in weights)  # task a's head, part of the one head
        last = [v for k, v in weights.items() if k.startswith("heads.b.parts.1.") and k.endswith("weight")][-1]
        assert last.shape[0] == 3
        new = sum(v.numel() for k, v in weights.items() if k.startswith("heads.b.parts.1."))
        assert r["params_per_task"][1] == new  # the second task adds its 3 classes' outputs only
    else:
        assert r["params_per_task"][1] == 0  # nothing added: one head for every task
        assert sum(1 for k in weights if k.startswith("heads.") and k.endswith("weight")) == 1


def test_a_column_learner_refuses_the_class_scenario_in_one_line(tmp_path):
    pytest.importorskip("captcha")
    with pytest.raises(UserError, match="a column per task needs the task identity"):
        train_from_file(str(CONFIGS / "progressive.yaml"), tiny(tmp_path, "continual.scenario=domain"))
    assert not (tmp_path / "runs").exists()


def test_the_domain_scenario_needs_the_same_classes_in_every_stage(tmp_path):
    pytest.importorskip("captcha")
    stages = "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3, 4]}}]"
    with pytest.raises(UserError, match="domain needs the same classes in every stage"):
        train_from_file(
            str(CONFIGS / "progressive.yaml"),
            tiny(tmp_path, "continual.methods=[finetune]", "continual.scenario=domain", stages),
        )


def test_new_columns_can_start_from_the_previous_column(tmp_path):
    """continual.column_init=previous: column k's encoder starts as column k-1's trained encoder."""
    pytest.importorskip("captcha")
    import copy

    from mtl.config.load import build_config, load_config
    from mtl.config.stages import stage_configs
    from mtl.workflows.continual import build_learner, prepare_sequence

    raw, sources = load_config(CONFIGS / "progressive.yaml")
    raw = copy.deepcopy(raw)
    raw["continual"]["column_init"] = "previous"
    raw["data"].update(root=str(tmp_path / "chars"), options={"per_class": 2, "val_per_class": 2, "size": 16})
    raw["data"].update(image_size=16, resize_size=16)
    raw["model"]["encoder_options"] = {"widths": [8, 8, 16, 16]}
    sequence = prepare_sequence(stage_configs(raw, sources)[:2], torch.device("cpu"))
    learner = build_learner("independent", build_config(raw, sources), torch.device("cpu"))
    learner.train_model(0, sequence[0])
    with torch.no_grad():
        for p in learner.net.columns[0].stages.parameters():
            p.add_(1.0)  # "trained"
    first = [p.detach().clone() for p in learner.net.columns[0].stages.parameters()]
    learner.train_model(1, sequence[1])
    second = [p.detach() for p in learner.net.columns[1].stages.parameters()]
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


class StopOnce(Hook):
    """Asks the trainer to stop (as SIGTERM does) when it reaches global step ``step`` of task ``task`` by training,
    when armed: so once per method (a resumed trainer starts past that step)."""

    armed = False
    stops = 0

    def __init__(self, task, step):
        self.task, self.step = task, step

    def after_step(self, trainer, losses):
        if StopOnce.armed and self.task in trainer.tasks and trainer.global_step == self.step:
            StopOnce.stops += 1
            trainer.request_stop()


def _summary_of(root):
    return json.loads((root / "summary.json").read_text())


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_every_learner_resumes_exactly_after_a_kill_in_the_middle_of_a_task(tmp_path, monkeypatch, scenario):
    """Killed in the middle of an epoch of the second task and resumed, every learner ends with the same R matrix
    and the same weights as without the kill (deterministic CPU run). Each method is killed once: the run is
    resumed until it completes."""
    pytest.importorskip("captcha")
    monkeypatch.setitem(HOOKS._entries, "stop_once", StopOnce)
    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)  # no pictures: half the time
    methods = [m for m in LEARNERS.names() if scenario in LEARNERS.get(m).scenarios]
    overrides = [
        f"continual.methods=[{','.join(methods)}]",
        f"continual.scenario={scenario}",
        "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3]}}]",
        "train.deterministic=true",
        "train.log_images=0",
        "train.hooks=[{name: stop_once, options: {task: b, step: 3}}]",  # 2 steps per epoch: epoch 2, step 1
        "continual.buffer_size=8",  # smaller than a task's 12 samples: the reservoir replaces
        "continual.options={agem: {replay_batch_size: 4}}",
    ]
    runs = {}
    for name, armed in (("whole", False), ("killed", True)):
        StopOnce.armed = armed
        args = tiny(tmp_path / name, *overrides)
        if armed:
            StopOnce.stops = 0
            with pytest.raises(KeyboardInterrupt):
                train_from_file(str(CONFIGS / "progressive.yaml"), args)
            (root,) = (tmp_path / name / "runs" / "progressive").iterdir()
            first = "independent" if "independent" in methods else methods[0]  # the order a run trains them in
            assert (root / first / "b" / "checkpoints" / "last.pt").is_file()
            assert not (root / first / "b" / "summary.json").exists()
            codes = [main(["train", "--resume", str(root)]) for _ in methods]
            assert codes[-1] == 0 and StopOnce.stops == len(methods), codes
        else:
            train_from_file(str(CONFIGS / "progressive.yaml"), args)
            (root,) = (tmp_path / name / "runs" / "progressive").iterdir()
        runs[name] = root
    whole, resumed = _summary_of(runs["whole"]), _summary_of(runs["killed"])
    for m in methods:
        assert resumed["methods"][m]["R"] == whole["methods"][m]["R"], m
        for task in ("a", "b"):
            a = load_checkpoint(runs["whole"] / m / task / "checkpoints" / "last.pt")["model"]
            b = load_checkpoint(runs["killed"] / m / task / "checkpoints" / "last.pt")["model"]
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (m, task)
            kept = runs["whole"] / m / task / "learner.pt"  # what later tasks need: Fisher, memory, old model, ...
            if kept.is_file():
                la, lb = _flat(load_checkpoint(kept)), _flat(load_checkpoint(runs["killed"] / m / task / "learner.pt"))
                assert la and len(la) == len(lb) and all(torch.equal(x, y) for x, y in zip(la, lb)), (m, task)


def _flat(state):
    """Every tensor of a nested state, in order."""
    if isinstance(state, torch.Tensor):
        return [state]
    items = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return [t for v in items for t in _flat(v)]


def test_mtl_eval_and_predict_of_a_class_incremental_task_run_score_over_every_class(tmp_path, monkeypatch):
    """A class-incremental task run is loaded with the one grown head and scored at its offset: mtl eval gives its
    R entry back, and predictions name classes of every task seen."""
    pytest.importorskip("captcha")
    from pathlib import Path

    from mtl.workflows.evaluate import eval_command
    from mtl.workflows.runs import load_model

    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)
    stages = "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3, 4]}}]"
    args = tiny(tmp_path, "continual.methods=[finetune]", "continual.scenario=class", stages, "train.epochs=1")
    (summary,) = train_from_file(str(CONFIGS / "progressive.yaml"), args)
    run = Path(summary["run_dir"]) / "finetune" / "b"
    loaded, first = load_model(run), load_model(run.parent / "a")
    named = loaded.tasks["b"].classes  # what predictions are named by: a's two classes, then b's three
    assert len(named) == 5 and named[:2] == first.classes["a"] and named[2:] == loaded.classes["b"]
    eval_command(str(run), "val")
    metrics = json.loads((run / "eval" / "val" / "metrics.json").read_text())
    assert metrics["acc"] == pytest.approx(summary["methods"]["finetune"]["R"][1][1], abs=1e-6)
