"""The regularization learners (ewc, online_ewc, si, lwf): each defining mechanism against an independent computation
(per-sample autograd loops in float64, closed forms, step-by-step reference loops, hand-made cases), their state,
and one tiny run of all four in each scenario."""

import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from test_continual import CONFIGS, tiny
from test_learners import Tiny
from torch import nn
from torch.utils.data import DataLoader

from mtl.config.schema import Config
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.meter import Meter
from mtl.engine.trainer import Trainer
from mtl.models.transfer import TransferModel
from mtl.tasks.classification import Classification
from mtl.workflows.learners import LEARNERS, ConcatHeads
from mtl.workflows.regularization import (
    EWC,
    SI,
    LwF,
    OnlineEWC,
    PathIntegral,
    distillation_loss,
    fisher_diagonal,
)
from mtl.workflows.stages import train_from_file

CPU = torch.device("cpu")
METHODS = ("ewc", "online_ewc", "si", "lwf")


class Encoder(nn.Module):
    """Pooled features from a linear layer, BatchNorm (with non-trivial running statistics) and a ReLU."""

    out_dim = 4

    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(3, 4), nn.BatchNorm1d(4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return {"out": torch.relu(self.bn(self.fc(x)))}


def learner(cls, scenario="task", heads=(("a", 2),), **options):
    """A learner of ``cls`` holding a tiny encoder and heads (float64), as if train_model had built them."""
    top = Config()
    top.continual.scenario = scenario
    out = cls(top, CPU, **options)
    out.encoder = Encoder().double()
    offset = 0
    for name, classes in heads:
        out.heads[name] = nn.Linear(4, classes).double()
        out.offsets[name], offset = offset, offset + classes
    return out


def loop_fisher(model, params, xs, ys, empirical, logits=lambda out: out["t"]):
    """The Fisher diagonal one sample and one label at a time: autograd of log p(y|x), squared, weighted by the
    model's p(y|x) over every class y (or the data's label alone), averaged over the samples."""
    model.eval()
    names, tensors = list(params), list(params.values())
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in zip(xs, ys):
        log_p = torch.log_softmax(logits(model(x[None]))[0], dim=0)
        labels = [(1.0, int(y))] if empirical else [(math.exp(log_p[c].item()), c) for c in range(log_p.shape[0])]
        for weight, c in labels:
            for n, g in zip(names, torch.autograd.grad(log_p[c], tensors, retain_graph=True)):
                total[n] += weight * g**2
    return {n: t / len(xs) for n, t in total.items()}


def close(a, b, **kw):
    return a.keys() == b.keys() and all(torch.allclose(a[n], b[n], **kw) for n in a)


# --------------------------------------------------------------------------- Fisher


@pytest.mark.parametrize("empirical", [False, True])
def test_the_fisher_diagonal_equals_a_per_sample_loop(empirical):
    """Per-sample gradients (vmap) of a model with BatchNorm in eval mode, for parameters named the caller's way
    (a subset: the head's bias is left out), over batches of different sizes, against the one-at-a-time loop."""
    torch.manual_seed(0)
    model = TransferModel(Encoder(), {"t": nn.Linear(4, 3)}).double().train()
    params = {f"mine/{n}": p for n, p in model.named_parameters() if n != "heads.t.bias"}
    xs, ys = torch.randn(7, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    batches = [(xs[:3], ys[:3]), (xs[3:], ys[3:])]
    fisher = fisher_diagonal(model, params, batches, lambda out: out["t"], empirical=empirical)
    assert model.training  # put back as it was
    assert close(fisher, loop_fisher(model, params, xs, ys, empirical), rtol=1e-10, atol=1e-12)
    assert all(f.grad_fn is None for f in fisher.values())


def test_the_fisher_of_a_softmax_linear_model_has_its_closed_form():
    """logits = W x + b: d log p(y|x) / dW = (e_y - p) x^T, so the Fisher diagonal is mean_n p_c (1 - p_c) x_j^2
    (bias: p_c (1 - p_c)), and the empirical one mean_n (1[y_n = c] - p_c)^2 x_j^2."""
    torch.manual_seed(1)
    model = nn.Linear(5, 4).double()
    xs, ys = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 4, (9,))
    params = dict(model.named_parameters())
    p = torch.softmax(model(xs), dim=1).detach()
    exact = fisher_diagonal(model, params, [(xs, ys)])
    assert torch.allclose(exact["weight"], torch.einsum("nc,nj->cj", p * (1 - p), xs**2) / 9)
    assert torch.allclose(exact["bias"], (p * (1 - p)).mean(0))
    residual = F.one_hot(ys, 4).double() - p
    empirical = fisher_diagonal(model, params, [(xs[:4], ys[:4]), (xs[4:], ys[4:])], empirical=True)
    assert torch.allclose(empirical["weight"], torch.einsum("nc,nj->cj", residual**2, xs**2) / 9)
    assert torch.allclose(empirical["bias"], (residual**2).mean(0))


def task_data(name, n=10, classes=2, seed=0):
    """A training loader as the sequence gives one: {"image": x, "targets": {name: local label}}, shuffled."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = torch.randn(n, 3, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)
    items = [{"image": x, "targets": {name: y}} for x, y in zip(xs, ys)]
    loader = DataLoader(items, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(name=name, loaders={"train": loader}), xs, ys


def test_ewc_keeps_a_fisher_and_anchor_per_task_and_leaves_the_random_state_alone():
    """Class scenario: the one head is all tasks' heads side by side, task b's labels are classes 2.. of it, and the
    penalty covers the encoder and every head."""
    ewc = learner(EWC, "class", heads=(("a", 2), ("b", 3)))
    st, xs, ys = task_data("b", classes=3)
    model = TransferModel(ewc.encoder, {"b": ConcatHeads(list(ewc.heads.values()))})
    cpu_rng, loader_rng = torch.get_rng_state(), st.loaders["train"].generator.get_state()
    ewc.end_task(1, st, model)
    assert torch.equal(torch.get_rng_state(), cpu_rng)
    assert torch.equal(st.loaders["train"].generator.get_state(), loader_rng)
    named = {n: p for n, p in model.named_parameters()}
    ours = {"encoder.fc.weight": "encoder.fc.weight", "heads.a.weight": "heads.b.parts.0.weight"}
    expected = loop_fisher(model, named, xs, ys + 2, empirical=False, logits=lambda out: out["b"])
    (fisher,), (anchor,) = ewc.fishers, ewc.anchors
    assert set(fisher) == set(ewc.regularized()) and len(fisher) == 8  # encoder fc, bn; heads a, b
    for mine, theirs in ours.items():
        assert torch.allclose(fisher[mine], expected[theirs], rtol=1e-10, atol=1e-12)
        assert torch.equal(anchor[mine], named[theirs]) and anchor[mine] is not named[theirs]
    assert set(learner(EWC).regularized()) == {n for n in fisher if n.startswith("encoder.")}  # task: no heads

    few = learner(EWC, "class", heads=(("a", 2), ("b", 3)), fisher_samples=3)
    few.encoder, few.heads = ewc.encoder, ewc.heads
    few.end_task(1, st, model)
    few.end_task(1, st, model)
    assert close(few.fishers[0], few.fishers[1]) and not close(few.fishers[0], fisher)  # 3 samples, seeded


def test_the_ewc_penalty_is_lambda_half_the_fisher_weighted_squared_distance_summed_over_tasks():
    torch.manual_seed(2)
    ewc = learner(EWC, "domain", lambda_=0.7)
    live = ewc.regularized()
    first = {n: p for n, p in live.items() if n.startswith("encoder.fc")}  # a task that trained less
    ewc.fishers = [{n: torch.rand_like(p) for n, p in params.items()} for params in (first, live)]
    ewc.anchors = [{n: torch.randn_like(p) for n, p in params.items()} for params in (first, live)]
    penalty = ewc.extension(2, None).extra_loss(None, None, {}, {})
    expected = 0.0
    for fisher, anchor in zip(ewc.fishers, ewc.anchors):
        for n, f in fisher.items():
            for i in itertools.product(*map(range, f.shape)):
                expected += 0.7 / 2 * f[i].item() * (live[n][i].item() - anchor[n][i].item()) ** 2
    assert penalty.item() == pytest.approx(expected, rel=1e-12)
    assert learner(EWC).extension(0, None) is None  # nothing to hold before the first task ends


def test_online_ewc_keeps_one_decayed_running_fisher_and_the_latest_anchor():
    """After three tasks: F* = gamma^2 F_1 + gamma F_2 + F_3, each F_k computed by the loop at the weights task k
    ended with; the penalty's precision is gamma F*; offline EWC keeps the three apart."""
    gamma = 0.6
    online = learner(OnlineEWC, "domain", gamma=gamma)
    offline = learner(EWC, "domain")
    offline.encoder, offline.heads = online.encoder, online.heads
    model = TransferModel(online.encoder, {"t": online.heads["a"]})
    params = online.regularized()
    by_model = {n: p for n, p in model.named_parameters()}
    fishers = []
    for k in range(3):
        with torch.no_grad():
            for p in params.values():
                p.add_(0.3 * torch.randn_like(p))  # what task k trained
        st, xs, ys = task_data("t", seed=k)
        online.end_task(k, st, model)
        offline.end_task(k, st, model)
        looped = loop_fisher(model, by_model, xs, ys, empirical=False)
        fishers.append({n: looped[n.replace("heads.a.", "heads.t.")] for n in params})
    expected = {n: gamma**2 * fishers[0][n] + gamma * fishers[1][n] + fishers[2][n] for n in params}
    assert len(online.fishers) == 1 and close(online.fishers[0], expected, rtol=1e-10, atol=1e-12)
    assert all(torch.equal(online.anchors[0][n], p) for n, p in params.items())
    (terms,) = online.extension(3, None).terms
    assert close(terms[0], {n: gamma * f for n, f in expected.items()}, rtol=1e-10, atol=1e-12)
    assert len(offline.fishers) == 3 and all(close(a, b, rtol=1e-10) for a, b in zip(offline.fishers, fishers))


# --------------------------------------------------------------------------- SI


def test_si_integrates_minus_the_task_gradient_times_the_applied_update_through_the_trainer():
    """Three SGD steps with momentum (so the update is not -lr g) and the surrogate of an earlier task, against a
    float64 loop: total gradient = dCE + 2 c Omega (theta - anchor), v = mu v + total, theta -= lr v, and
    omega -= dCE * (theta_new - theta) with the task's gradient alone."""
    torch.manual_seed(3)
    model, c, lr, mu = Tiny(), 0.3, 0.1, 0.5
    params = dict(model.named_parameters())
    omega = {n: torch.rand_like(p) for n, p in params.items()}
    anchor = {n: p.detach() + 0.2 * torch.randn_like(p) for n, p in params.items()}
    path = PathIntegral(params, omega, anchor, c)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=mu)
    trainer = Trainer(model, {"t": Classification("t", "t", 2)}, {}, opt, extension=path, epochs=1, device=CPU)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]

    theta = {n: p.detach().double().clone() for n, p in params.items()}
    velocity = {n: torch.zeros_like(t) for n, t in theta.items()}
    expected = {n: torch.zeros_like(t) for n, t in theta.items()}
    for x, y in batches:
        w, b = (theta[n].clone().requires_grad_() for n in ("layer.weight", "layer.bias"))
        task_grad = dict(
            zip(("layer.weight", "layer.bias"), torch.autograd.grad(F.cross_entropy(x.double() @ w.T + b, y), (w, b)))
        )
        for n in theta:
            total = task_grad[n] + 2 * c * omega[n].double() * (theta[n] - anchor[n].double())
            velocity[n] = mu * velocity[n] + total
            new = theta[n] - lr * velocity[n]
            expected[n] -= task_grad[n] * (new - theta[n])
            theta[n] = new
    for x, y in batches:
        trainer.step({"image": x, "targets": {"t": y}}, Meter(trainer.tasks, CPU), True)
    assert all(torch.allclose(params[n].double(), theta[n], atol=1e-6) for n in params)
    assert all(torch.allclose(path.omega[n].double(), expected[n], atol=1e-7) for n in params)

    again = PathIntegral(dict(Tiny().named_parameters()), omega, anchor, c)
    again.load_state_dict(trainer.state_dict()["extension"])  # the checkpoint holds omega and the start
    assert close(again.omega, path.omega) and close(again.start, path.start)


def test_si_importance_is_the_path_integral_over_the_squared_total_change_plus_xi_clamped_at_zero():
    """Two tasks of hand-made updates: Omega_1 = max(0, omega_1 / (Delta_1^2 + xi)), Omega_2 = max(0, Omega_1 +
    omega_2 / (Delta_2^2 + xi)), Delta_k the change over task k; the surrogate's own gradient 2 c Omega (theta -
    anchor) is not part of g in task 2."""
    torch.manual_seed(4)
    c, xi = 0.5, 0.01
    si = learner(SI, c=c, xi=xi)
    params = si.regularized()
    assert set(params) == {n for n in si.parameters_by_name() if n.startswith("encoder.")}
    importance, anchor = {}, {}
    for k in range(2):
        path = si.extension(k, None)
        start = {n: p.detach().clone() for n, p in params.items()}
        omega = {n: torch.zeros_like(p) for n, p in params.items()}
        for _ in range(3):
            updates = {}
            for n, p in params.items():
                g = torch.randn_like(p)
                p.grad = g + (2 * c * importance[n] * (p.detach() - anchor[n]) if importance else 0)
                updates[n] = 0.1 * torch.randn_like(p)  # whatever the optimizer applied
                omega[n] -= g * updates[n]
            path.before_update(None)
            with torch.no_grad():
                for n, p in params.items():
                    p.add_(updates[n])
            path.after_update(None, None, {}, {})
        assert close(path.omega, omega, atol=1e-12)
        si.end_task(k, None, None)
        for n, p in params.items():
            added = omega[n] / ((p.detach() - start[n]) ** 2 + xi)
            importance[n] = torch.clamp(importance[n] + added if k else added, min=0)
            anchor[n] = p.detach().clone()
        assert close(si.importance, importance, atol=1e-12) and close(si.anchor, anchor)
    assert any((i == 0).any() for i in importance.values())  # some were clamped
    restored = learner(SI)
    restored.load_state_dict(si.state_dict())
    assert close(restored.importance, si.importance) and close(restored.anchor, si.anchor)


# --------------------------------------------------------------------------- LwF


def test_the_distillation_term_is_the_cross_entropy_of_eqs_2_and_3():
    """Hand-made: old probabilities (0.8, 0.2) raised to 1/2 and renormalised are (2/3, 1/3); against a uniform
    new output that is ln 2. Then random logits against eq. 3 written with probabilities, and T = 1 as plain soft
    cross-entropy."""
    old, new = torch.log(torch.tensor([[0.8, 0.2]], dtype=torch.float64)) + 5.0, torch.zeros(1, 2, dtype=torch.float64)
    assert distillation_loss(new, old, 2.0).item() == pytest.approx(math.log(2), rel=1e-12)
    torch.manual_seed(5)
    old, new = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    for T in (1.0, 2.0, 5.0):
        y, y_hat = torch.softmax(old, 1) ** (1 / T), torch.softmax(new, 1) ** (1 / T)
        y, y_hat = y / y.sum(1, keepdim=True), y_hat / y_hat.sum(1, keepdim=True)
        expected = -(y * torch.log(y_hat)).sum(1).mean()
        assert distillation_loss(new, old, T).item() == pytest.approx(expected.item(), rel=1e-12)
    soft = F.cross_entropy(new, torch.softmax(old, 1))
    assert distillation_loss(new, old, 1.0).item() == pytest.approx(soft.item(), rel=1e-12)


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_lwf_distils_the_outputs_of_the_weights_the_previous_task_ended_with(scenario):
    """After task a ends, the weights move on (task b training) and task b's head is added: the recorded outputs
    are still those of the weights at the end of task a (eval mode), also after a state_dict round trip; the term
    is lambda_o KD over task a's head (task) or over the one head's first two classes (class)."""
    torch.manual_seed(6)
    lwf = learner(LwF, scenario, temperature=3.0, lambda_o=0.4)
    ended = copy.deepcopy(TransferModel(lwf.encoder, {"a": lwf.heads["a"]})).eval()
    lwf.end_task(0, SimpleNamespace(name="a"), None)
    with torch.no_grad():
        for p in lwf.parameters_by_name().values():
            p.add_(torch.randn_like(p))
    lwf.heads["b"] = nn.Linear(4, 3).double()
    heads = dict(lwf.heads) if scenario == "task" else {"b": ConcatHeads(list(lwf.heads.values()))}
    model = TransferModel(lwf.encoder, heads).train()
    x = torch.randn(5, 3, dtype=torch.float64)
    outputs = model(x)
    term = lwf.extension(1, SimpleNamespace(name="b")).extra_loss(model, x, {}, outputs)
    recorded = ended(x)["a"].detach()
    new = outputs["a"] if scenario == "task" else outputs["b"][:, :2]
    assert term.item() == pytest.approx(0.4 * distillation_loss(new, recorded, 3.0).item(), rel=1e-12)
    assert term.requires_grad  # it trains the encoder and (task) the old head

    again = learner(LwF, scenario)  # as a resumed sequence builds it: task a's head
    again.load_state_dict(lwf.state_dict())
    (old,) = again.old(x).values()
    assert torch.allclose(old, recorded, rtol=1e-12) and not any(p.requires_grad for p in again.old.parameters())
    assert learner(LwF, scenario).extension(0, SimpleNamespace(name="a")) is None


# --------------------------------------------------------------------------- options and runs


@pytest.mark.parametrize(
    "cls, options, message",
    [
        (EWC, {"fisher": "true"}, "continual.options.ewc.fisher must be exact"),
        (EWC, {"fisher_samples": 0}, "fisher_samples must be an integer >= 1 or null"),
        (EWC, {"lambda_": -1}, "lambda_ must be a number >= 0"),
        (OnlineEWC, {"gamma": 1.5}, r"continual.options.online_ewc.gamma must be in \(0, 1\]"),
        (SI, {"xi": 0}, "continual.options.si.xi must be a number > 0"),
        (LwF, {"temperature": "2"}, "continual.options.lwf.temperature must be a number > 0, got '2'"),
    ],
)
def test_bad_options_are_refused_in_one_line(cls, options, message):
    with pytest.raises(UserError, match=message) as e:
        cls(Config(), CPU, **options)
    assert "\n" not in str(e.value)


def test_a_softmax_method_refuses_a_stage_that_is_not_a_classification():
    st = SimpleNamespace(name="s", task=SimpleNamespace(type_name="binary"))
    with pytest.raises(UserError, match="'lwf' needs classification stages .* stage 's' is a binary task"):
        LwF(Config(), CPU).train_model(0, st)


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """The rendered characters, shared by the runs below."""
    return tmp_path_factory.mktemp("chars")


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_every_method_runs_a_two_task_sequence(tmp_path, monkeypatch, chars, scenario):
    """What each method keeps after task a (learner.pt, read with weights_only) holds task a's best weights: EWC's
    and SI's anchors, LwF's copy; the Fisher and the importance are finite and not all zero. LwF in the task
    scenario trains task a's head along (its weights are in task b's checkpoint, changed)."""
    pytest.importorskip("captcha")
    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)  # no heatmaps: seconds saved
    stages = "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3]}}]"
    overrides = [
        f"continual.methods=[{','.join(METHODS)}]",
        f"continual.scenario={scenario}",
        stages,
        f"data.root={chars}",
    ]
    (summary,) = train_from_file(str(CONFIGS / "progressive.yaml"), tiny(tmp_path, *overrides, "train.epochs=1"))
    root = tmp_path / "runs"
    for method in METHODS:
        assert [len(row) for row in summary["methods"][method]["R"]] == [1, 2], method
        (run,) = root.rglob(f"{method}/a")
        best = load_checkpoint(run / "checkpoints" / "best.pt")["model"]
        parameters = {k for k in best if k.startswith("encoder.") and k.endswith(("weight", "bias"))}
        kept = load_checkpoint(run / "learner.pt")
        if method == "lwf":
            weights, importances = kept["old"], {}
        elif method == "si":
            weights, importances = kept["anchor"], kept["importance"]
        else:
            weights, importances = kept["anchors"][0], kept["fishers"][0]
        weights = {k: v for k, v in weights.items() if k in parameters}
        assert set(weights) == parameters and all(torch.equal(weights[k], best[k]) for k in weights), method
        if importances:
            values = torch.cat([v.flatten() for v in importances.values()])
            assert torch.isfinite(values).all() and (values >= 0).all() and values.sum() > 0, method
    if scenario == "task":
        (a,), (b,) = root.rglob("lwf/a"), root.rglob("lwf/b")
        before = load_checkpoint(a / "checkpoints" / "best.pt")["model"]["heads.a.0.weight"]
        after = load_checkpoint(b / "checkpoints" / "best.pt")["model"]["heads.a.0.weight"]
        assert not torch.equal(before, after)


def test_the_methods_are_registered():
    assert set(METHODS) <= set(LEARNERS.names())
