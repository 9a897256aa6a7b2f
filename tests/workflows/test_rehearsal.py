"""Rehearsal learners (er, derpp, agem): the reservoir buffer against its sampling law, each method's step against
an independent computation of its equation, and whole continual runs (task and class scenarios, exact resume)."""

import copy
import io
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_continual import CONFIGS, tiny

from mtl.config.load import build_config
from mtl.config.schema import Config, TaskCfg
from mtl.core.checkpoint import load_checkpoint
from mtl.core.errors import UserError
from mtl.engine.meter import Meter
from mtl.engine.trainer import Trainer
from mtl.tasks.classification import Classification
from mtl.workflows.continual import SequenceTask
from mtl.workflows.learners import build_learner
from mtl.workflows.rehearsal import ReservoirBuffer, agem_project, memory_quotas
from mtl.workflows.stages import train_from_file

CPU = torch.device("cpu")


# --------------------------------------------------------------------------- the reservoir buffer


def _stream(buffer, generator, n, batch):
    """Offer positions 0..n-1 (as the inputs) in batches of ``batch``."""
    for start in range(0, n, batch):
        buffer.add(generator, y=torch.arange(start, min(start + batch, n)))


def test_the_reservoir_holds_the_first_capacity_samples_in_order_until_it_is_full():
    buffer = ReservoirBuffer(5, CPU)
    g = torch.Generator().manual_seed(0)
    _stream(buffer, g, 4, batch=3)
    assert len(buffer) == 4 and buffer.seen == 4
    assert buffer.items()["y"].tolist() == [0, 1, 2, 3]
    _stream(buffer, g, 1, batch=1)  # the fifth sample (position 0 again as a value): slot 4, nothing replaced
    assert buffer.items()["y"].tolist() == [0, 1, 2, 3, 0] and buffer.seen == 5


def test_the_reservoir_is_a_uniform_sample_of_the_stream():
    """Algorithm R keeps every stream position with probability M/N. Over R independent streams (one seeded
    generator), each position's inclusion count is Binomial(R, M/N); Hoeffding's bound with a union over the N
    positions puts every frequency within t of M/N except with probability 2 N exp(-2 R t^2) <= 1e-6."""
    M, N, R = 2, 8, 1500  # t = 0.074: j drawn from 0..i-1 instead (inclusion 1/7 for positions 0, 1) would fail
    g = torch.Generator().manual_seed(1)
    counts = np.zeros(N)
    for _ in range(R):
        buffer = ReservoirBuffer(M, CPU)
        _stream(buffer, g, N, batch=3)  # batches also test the in-order semantics within a batch
        kept = buffer.items()["y"]
        assert len(set(kept.tolist())) == M  # never the same sample twice
        counts[kept.numpy()] += 1
    t = math.sqrt(math.log(2 * N / 1e-6) / (2 * R))
    assert np.abs(counts / R - M / N).max() <= t


def test_replay_batches_are_drawn_uniformly_without_replacement_from_the_filled_slots():
    buffer = ReservoirBuffer(8, CPU)
    _stream(buffer, torch.Generator().manual_seed(0), 5, batch=5)
    g = torch.Generator().manual_seed(2)
    counts, R = np.zeros(8), 3000
    for _ in range(R):
        drawn = buffer.sample(2, g)["y"].tolist()
        assert len(set(drawn)) == 2
        counts[drawn] += 1
    assert counts[5:].sum() == 0
    t = math.sqrt(math.log(2 * 5 / 1e-6) / (2 * R))  # Hoeffding + union bound, as above; each slot: p = 2/5
    assert np.abs(counts[:5] / R - 2 / 5).max() <= t
    assert buffer.sample(10, g)["y"].sort().values.tolist() == [0, 1, 2, 3, 4]  # at most what it holds


def test_the_buffer_state_round_trips_through_a_weights_only_file():
    def offer(buffer, generator, start, width):  # 3 samples with logits of a (growing) width
        y = torch.arange(start, start + 3)
        buffer.add(generator, y=y, task=torch.zeros_like(y), logits=y[:, None].expand(3, width).float())

    a, b = ReservoirBuffer(4, CPU), ReservoirBuffer(4, CPU)
    g = torch.Generator().manual_seed(0)
    offer(a, g, 0, 2)
    offer(a, g, 3, 2)
    f = io.BytesIO()
    torch.save(a.state_dict(), f)
    f.seek(0)
    b.load_state_dict(torch.load(f, weights_only=True))
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for buf, gen in ((a, ga), (b, gb)):
        offer(buf, gen, 6, 5)
        offer(buf, gen, 9, 5)
    assert a.seen == b.seen == 12 and a.items()["logits"].shape == (4, 5)
    assert a.items()["width"].tolist() == [2 if y < 6 else 5 for y in a.items()["y"].tolist()]
    assert a.items().keys() == b.items().keys()
    assert all(torch.equal(a.items()[k], b.items()[k]) for k in a.items())


# --------------------------------------------------------------------------- the methods' steps


def _learner(method, scenario, sizes=(2, 3), buffer_size=200, **options):
    """A learner on tiny stages (small_cnn without normalisation on 8x8 images) and the stages' SequenceTasks."""
    top = Config()
    top.model.encoder, top.model.encoder_options = "small_cnn", {"widths": [4, 4], "norm": "none"}
    top.continual.scenario, top.continual.buffer_size, top.data.batch_size = scenario, buffer_size, 4
    top.continual.methods, top.continual.options = [method], {method: options}
    learner = build_learner(method, top, CPU)
    stages = []
    for name, n in zip("abc", sizes):
        cfg = copy.deepcopy(top)
        cfg.name, cfg.tasks = name, {name: TaskCfg(type="classification", num_classes=n)}
        stages.append(SequenceTask(cfg, Classification(name, name, n), {}, torch.Generator(), {}))
    return learner, stages


def _per_sample_logits(encoder, heads, scenario, x, name):
    """One sample's logits as the scenario predicts its task (an independent reading of the scenarios)."""
    pooled = encoder(x[None])["out"]
    if scenario == "class":
        return torch.cat([head(pooled) for head in heads.values()], dim=1)[0]
    return (heads["a"] if scenario == "domain" else heads[name])(pooled)[0]


def _target(scenario, name, y, sizes):
    return int(y) + (sum(sizes[: "ab".index(name)]) if scenario == "class" else 0)


def _trained(learner):
    """The parameters that train now, and deep copies of the encoder and heads holding the same values."""
    modules = [learner.encoder, *learner.heads.values()]
    params = [p for m in modules for p in m.parameters()]
    encoder, heads = copy.deepcopy(learner.encoder), copy.deepcopy(learner.heads)
    copies = [p for m in [encoder, *heads.values()] for p in m.parameters()]
    keep = [i for i, p in enumerate(params) if p.requires_grad]
    return [params[i] for i in keep], [copies[i].requires_grad_() for i in keep], encoder, heads


@pytest.mark.parametrize("scenario", ["task", "class", "domain"])
def test_er_steps_on_the_mean_loss_over_the_union_of_the_batch_and_the_replay_batch(scenario):
    """Chaudhry et al. 2019, Algorithm 1: the step's gradient is that of the cross-entropy averaged over the current
    batch and the replayed one together, each sample scored on the head its scenario gives its task (computed here
    sample by sample on copies of the networks)."""
    torch.manual_seed(0)
    sizes = (3, 3) if scenario == "domain" else (2, 3)
    learner, (a, b) = _learner("er", scenario, sizes, replay_batch_size=6)  # the replay batch: the whole buffer
    model_a = learner.train_model(0, a)
    xa, ya = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    learner.extension(0, a).after_update(model_a, xa, {"a": ya}, {})
    model = learner.train_model(1, b)
    ext = learner.extension(1, b)
    xo, yo = torch.randn(2, 3, 8, 8), torch.tensor([2, 0])
    ext.after_update(model, xo, {"b": yo}, {})
    assert len(learner.buffer) == 6
    x, y = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 0])

    params, copies, encoder, heads = _trained(learner)
    before = [p.detach().clone() for p in params]
    samples = [(xa[i], ya[i], "a") for i in range(4)] + [(xo[i], yo[i], "b") for i in range(2)]
    samples += [(x[i], y[i], "b") for i in range(3)]
    loss = sum(
        F.cross_entropy(
            _per_sample_logits(encoder, heads, scenario, xi, name)[None],
            torch.tensor([_target(scenario, name, yi, sizes)]),
        )
        for xi, yi, name in samples
    ) / len(samples)
    expected = torch.autograd.grad(loss, copies)

    tasks = {"b": learner.task(1, b)}
    trainer = Trainer(model, tasks, {}, torch.optim.SGD(params, lr=1.0), extension=ext, epochs=1, device=CPU)
    trainer.step({"image": x, "targets": {"b": y}}, Meter(tasks, CPU), True)
    for p, p0, g in zip(params, before, expected):
        assert torch.allclose(p0 - p.detach(), g, atol=1e-6)
    assert len(learner.buffer) == 9 and learner.buffer.seen == 9  # the batch joined after the update


@pytest.mark.parametrize("scenario", ["task", "class"])
def test_the_derpp_term_is_alpha_times_the_logit_distance_plus_beta_times_the_replay_loss(scenario):
    """Buzzega et al. 2020, eq. 6, by hand from the stored values: the squared distance of each replayed sample's
    logits to the stored ones over the columns stored (task a's 2 classes, even on the class scenario's grown head of
    5), averaged over those entries, and the replayed samples' cross-entropy."""
    torch.manual_seed(0)
    sizes = (2, 3)
    alpha, beta = 0.3, 0.7
    learner, (a, b) = _learner("derpp", scenario, sizes, alpha=alpha, beta=beta, replay_batch_size=5)
    model_a = learner.train_model(0, a)
    xa, ya, za = torch.randn(3, 3, 8, 8), torch.tensor([0, 1, 1]), torch.randn(3, 2)
    learner.extension(0, a).after_update(model_a, xa, {"a": ya}, {"a": za})
    model = learner.train_model(1, b)
    ext = learner.extension(1, b)
    xb, yb, zb = torch.randn(2, 3, 8, 8), torch.tensor([2, 0]), torch.randn(2, 5 if scenario == "class" else 3)
    ext.after_update(model, xb, {"b": yb}, {"b": zb})

    term = ext.extra_loss(model, xb, {"b": yb}, {})  # both replay batches: the whole buffer, in some order
    squares, entries, ce = 0.0, 0, 0.0
    stored = [(xa[i], ya[i], za[i], "a") for i in range(3)] + [(xb[i], yb[i], zb[i], "b") for i in range(2)]
    with torch.no_grad():
        for xi, yi, zi, name in stored:
            h = _per_sample_logits(learner.encoder, learner.heads, scenario, xi, name)
            squares += ((h[: len(zi)] - zi) ** 2).sum().item()
            entries += len(zi)
            ce += F.cross_entropy(h[None], torch.tensor([_target(scenario, name, yi, sizes)])).item()
    assert term.item() == pytest.approx(alpha * squares / entries + beta * ce / len(stored), rel=1e-5)


def test_agem_projection_matches_eq_11_and_solves_the_half_space_problem():
    """g~ = g - (g.r / r.r) r when g.r < 0, else g: a hand case, no conflict left on random pairs, g unchanged
    without a conflict, and g~ the closest point to g of {v : v.r >= 0}: as close as the closest feasible point of a
    fine grid in 2-D, and never beaten by random feasible points in 6-D."""
    g, r = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.tensor([-1.0, 1.0], dtype=torch.float64)
    assert torch.allclose(agem_project(g, r), torch.tensor([0.5, 0.5], dtype=torch.float64))
    rng = torch.Generator().manual_seed(0)
    for _ in range(200):
        g, r = torch.randn(6, generator=rng, dtype=torch.float64), torch.randn(6, generator=rng, dtype=torch.float64)
        new = agem_project(g, r)
        assert new @ r >= -1e-12 * g.norm() * r.norm()
        if g @ r >= 0:
            assert torch.equal(new, g)
    axis = torch.linspace(-3, 3, 601, dtype=torch.float64)
    grid = torch.cartesian_prod(axis, axis)
    for _ in range(20):
        g, r = torch.randn(2, generator=rng, dtype=torch.float64), torch.randn(2, generator=rng, dtype=torch.float64)
        new = agem_project(g, r)
        nearest = (grid[grid @ r >= 0] - g).norm(dim=1).min()  # a feasible grid point lies within 0.015 of g~
        assert new @ r >= -1e-12 and (new - g).norm() <= nearest + 1e-12 and nearest <= (new - g).norm() + 0.015
    for _ in range(20):
        g, r = torch.randn(6, generator=rng, dtype=torch.float64), torch.randn(6, generator=rng, dtype=torch.float64)
        v = g + torch.randn(5000, 6, generator=rng, dtype=torch.float64)
        v = v[v @ r >= 0]
        assert ((v - g) ** 2).sum(1).min() >= ((agem_project(g, r) - g) ** 2).sum() - 1e-12


@pytest.mark.parametrize("labels", ["conflicting", "agreeing"])
def test_agem_replaces_the_step_gradient_by_its_projection_against_the_memory_gradient(labels):
    """The gradients in p.grad after before_update equal eq. 11 applied to g (the current batch's loss) and g_ref
    (the memory's loss), both computed again in float64 on copies. Domain scenario, one head: memory labels 0 and
    current labels 1 on the same images conflict; the same labels agree (g passes unchanged)."""
    torch.manual_seed(0)
    learner, (a, b) = _learner("agem", "domain", (3, 3), replay_batch_size=256)
    model_a = learner.train_model(0, a)
    x = torch.randn(4, 3, 8, 8)
    ym, y = torch.zeros(4, dtype=torch.long), torch.full((4,), 1 if labels == "conflicting" else 0)
    learner.extension(0, a).after_update(model_a, x, {"a": ym}, {})
    learner.end_task(0, a, model_a)
    model = learner.train_model(1, b)
    ext = learner.extension(1, b)

    params, copies, encoder, heads = _trained(learner)
    for module in (encoder, *heads.values()):
        module.double()
    xd = x.double()

    def gradient(labels):
        loss = F.cross_entropy(heads["a"](encoder(xd)["out"]), labels)
        return torch.cat([t.flatten() for t in torch.autograd.grad(loss, copies)])

    g, r = gradient(y), gradient(ym)
    dot = float(g @ r)
    assert (dot < 0) == (labels == "conflicting")
    expected = g - dot / float(r @ r) * r if dot < 0 else g

    model.zero_grad()
    F.cross_entropy(model(x)["b"], y).backward()
    ext.before_update(model)
    got = torch.cat([p.grad.flatten() for p in params]).double()
    assert torch.allclose(got, expected, atol=1e-6, rtol=1e-4)
    assert float(got @ r) >= -1e-6


def test_agem_memory_keeps_equal_shares_of_each_finished_task():
    """buffer_size 5: task 0 keeps 5 samples; after task 1 the shares are 3 + 2, after task 2 they are 2 + 2 + 1
    (the remainder to the earliest); each task's share is a subset of what it held before."""
    assert memory_quotas(5, 1) == [5] and memory_quotas(5, 2) == [3, 2] and memory_quotas(5, 3) == [2, 2, 1]
    learner, stages = _learner("agem", "task", (2, 2, 2), buffer_size=5)
    held, value = [], 0
    for k, st in enumerate(stages):
        model = learner.train_model(k, st)
        ext = learner.extension(k, st)
        for _ in range(3):  # a stream of 9 samples, each image filled with its own number
            x = torch.arange(value, value + 3, dtype=torch.float32)[:, None, None, None].expand(3, 3, 8, 8)
            ext.after_update(model, x, {st.name: torch.tensor([0, 1, 0])}, {})
            value += 3
        learner.end_task(k, st, model)
        now = [sorted(part["x"][:, 0, 0, 0].tolist()) for part in learner.memory]
        assert [len(s) for s in now] == memory_quotas(5, k + 1)
        assert all(set(s) <= set(h) for s, h in zip(now, held))
        assert [part["task"].tolist() for part in learner.memory] == [[j] * len(s) for j, s in enumerate(now)]
        held = now
    state = learner.state_dict()
    f = io.BytesIO()
    torch.save(state, f)
    f.seek(0)
    again, _ = _learner("agem", "task", (2, 2, 2), buffer_size=5)
    again.load_state_dict(torch.load(f, weights_only=True))
    assert all(torch.equal(p["x"], q["x"]) for p, q in zip(again.memory, learner.memory))


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("derpp", {"alpha": -1}, "continual.options.derpp.alpha must be a number >= 0, got -1"),
        ("er", {"replay_batch_size": 0}, "continual.options.er.replay_batch_size must be an integer >= 1"),
        ("agem", {"lambda_": 1}, "unknown option(s) lambda_ for method 'agem'; known: replay_batch_size"),
    ],
)
def test_bad_options_are_refused_in_one_line(method, options, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        _learner(method, "task", **options)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="buffer_size"):
        build_config({"continual": {"buffer_size": 0}}, {})


# --------------------------------------------------------------------------- whole continual runs

STAGES = "stages=[{name: a, data: {classes: [0, 1]}}, {name: b, data: {classes: [2, 3, 4]}}]"
METHODS = ("er", "derpp", "agem")


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    """One folder of rendered characters for every run of this file."""
    pytest.importorskip("captcha")
    return tmp_path_factory.mktemp("chars")


@pytest.fixture
def no_heatmaps(monkeypatch):
    """No R heatmaps (most of a tiny run's time; tests/workflows/test_continual.py checks them)."""
    monkeypatch.setattr("mtl.workflows.continual.have_matplotlib", lambda: False)


def _run(out, chars, *overrides):
    return train_from_file(
        str(CONFIGS / "progressive.yaml"),
        tiny(out, "continual.methods=[er,derpp,agem]", STAGES, "train.epochs=1", f"data.root={chars}", *overrides),
    )


def test_rehearsal_learners_run_the_class_scenario(tmp_path, chars, no_heatmaps):
    """One growing head: every learner trains both tasks, stores samples of both (DER++ with the logits of the head
    as it was: 2 columns for task a's samples, 5 for task b's) and scores each task over all 5 classes."""
    (summary,) = _run(tmp_path, chars, "continual.scenario=class", "continual.buffer_size=16")
    root = Path(summary["run_dir"])
    for method in METHODS:
        assert [len(row) for row in summary["methods"][method]["R"]] == [1, 2]
    er = load_checkpoint(root / "er" / "b" / "learner.pt")["buffer"]
    assert er["seen"] == 12 + 18 and len(er["fields"]["task"]) == 16 and set(er["fields"]["task"].tolist()) == {0, 1}
    derpp = load_checkpoint(root / "derpp" / "b" / "learner.pt")["buffer"]["fields"]
    assert derpp["logits"].shape[1] == 5 and set(derpp["width"].tolist()) == {2, 5}
    assert (derpp["width"] == torch.where(derpp["task"] == 0, 2, 5)).all()
    memory = load_checkpoint(root / "agem" / "b" / "learner.pt")["memory"]
    assert [len(part["task"]) for part in memory] == [8, 8]  # 16 in equal shares; tasks of 12 and 18 samples
