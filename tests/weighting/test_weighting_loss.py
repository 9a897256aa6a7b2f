"""Loss-level weighting methods: each one's defining property, plus a shared contract test."""

import math

import pytest
import torch
from torch import nn

from mtl.core.errors import UserError
from mtl.weighting import loss as _loss  # noqa: F401  (registers the methods)
from mtl.weighting.base import WEIGHTINGS, LossWeighting, build_weighting

torch.set_num_threads(1)

TASKS = ["a", "b"]
LOSS_METHODS = [n for n in WEIGHTINGS.names() if issubclass(WEIGHTINGS.get(n), LossWeighting)]


def test_equal_is_sum():
    w = build_weighting("equal", TASKS)
    losses = torch.tensor([0.3, 2.0], requires_grad=True)
    assert torch.allclose(w(losses), torch.tensor(2.3))
    assert torch.equal(w.last_weights, torch.ones(2))


def test_static_weighted_sum_and_gradient():
    w = build_weighting("static", TASKS, [2.0, 0.5])
    losses = torch.tensor([1.0, 4.0], requires_grad=True)
    total = w(losses)
    assert torch.allclose(total, torch.tensor(4.0))
    (grad,) = torch.autograd.grad(total, losses)
    assert torch.allclose(grad, torch.tensor([2.0, 0.5]))
    assert torch.allclose(w.last_weights, torch.tensor([2.0, 0.5]))


def test_uncertainty_learns_loss_scale():
    w = build_weighting("uncertainty", TASKS)
    opt = torch.optim.Adam(w.parameters(), lr=0.05)
    losses = torch.tensor([1.0, 4.0])
    for _ in range(400):
        opt.zero_grad()
        w(losses).backward()
        opt.step()
    assert torch.allclose(w.log_vars.exp(), losses, rtol=0.05)
    assert torch.allclose(w.last_weights, 0.5 / losses, rtol=0.06)
    assert w.last_weights[1] < w.last_weights[0]


def test_dwa_favours_slow_task():
    w = build_weighting("dwa", TASKS)
    losses = torch.tensor([1.0, 1.0])
    w(losses)
    assert torch.equal(w.last_weights, torch.ones(2))
    w.end_epoch(torch.tensor([1.0, 1.0]))
    w(losses)
    assert torch.equal(w.last_weights, torch.ones(2))  # still ones after one epoch
    w.end_epoch(torch.tensor([0.5, 1.0]))  # a fell fast, b stayed flat
    w(losses)
    expected = 2 * torch.softmax(torch.tensor([0.5, 1.0]) / 2.0, dim=0)
    assert torch.allclose(w.last_weights, expected)
    assert w.last_weights[1] > w.last_weights[0]
    assert torch.isclose(w.last_weights.sum(), torch.tensor(2.0))


def test_gradnorm_raises_weight_of_small_gradient_task():
    torch.manual_seed(0)
    shared = nn.Linear(4, 4)
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 1)])
    x, y = torch.randn(16, 4), torch.randn(16, 1)
    w = build_weighting("gradnorm", TASKS)
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters()], lr=1e-3)

    def losses() -> torch.Tensor:
        h = shared(x)
        return torch.stack([4.0 * ((heads[0](h) - y) ** 2).mean(), 0.25 * ((heads[1](h) - y) ** 2).mean()])

    for _ in range(15):
        opt.zero_grad()
        w(losses(), list(shared.parameters())).backward()
        opt.step()
    assert w.loss_weights[1] > 1.5 and w.loss_weights[0] < 0.5
    assert torch.isclose(w.loss_weights.sum(), torch.tensor(2.0))
    current = losses()
    norms = torch.stack([torch.autograd.grad(current[t], shared.weight, retain_graph=True)[0].norm() for t in range(2)])
    assert norms[0] / norms[1] > 8  # raw gradient norms differ a lot ...
    balanced = (w.loss_weights * norms)[0] / (w.loss_weights * norms)[1]
    assert 0.5 < balanced < 2  # ... the weighted ones are close


def test_gradnorm_needs_shared_parameters():
    w = build_weighting("gradnorm", TASKS)
    with pytest.raises(UserError, match="GradNorm needs trainable shared parameters"):
        w(torch.tensor([1.0, 2.0], requires_grad=True), [])


def test_rlw_random_sums_to_t_and_reproducible():
    w = build_weighting("rlw", TASKS)
    losses = torch.tensor([1.0, 2.0], requires_grad=True)  # a training step
    assert float(w(losses.detach())) == 3.0 and w.get_extra_state() == {"draws": 0}  # evaluation: w = 1, no draw
    total1 = w(losses)
    w1 = w.last_weights.clone()
    w(losses)
    w2 = w.last_weights.clone()
    assert not torch.allclose(w1, w2)
    # the draws depend on the seed and the step only, not on the global RNG (same on every process) ...
    again = build_weighting("rlw", TASKS)
    torch.manual_seed(123)
    assert torch.equal(again(losses), total1) and torch.equal(again.last_weights, w1)
    other = build_weighting("rlw", TASKS)
    other.seed = 1
    other(losses)
    assert not torch.allclose(other.last_weights, w1)
    # ... and a resumed run continues the sequence
    resumed = build_weighting("rlw", TASKS)
    resumed.load_state_dict(w.state_dict())
    resumed(losses)
    w(losses)
    assert torch.equal(resumed.last_weights, w.last_weights)
    assert torch.isclose(w1.sum(), torch.tensor(2.0))
    assert torch.isclose(total1, (w1 * losses).sum())


def test_geometric_mean_value_and_gradient():
    w = build_weighting("geometric_mean", ["a", "b", "c"])
    losses = torch.tensor([0.5, 2.0, 8.0], requires_grad=True)
    total = w(losses)
    assert torch.isclose(total, torch.tensor(2.0))
    (grad,) = torch.autograd.grad(total, losses)
    assert torch.allclose(grad, total.detach() / (3 * losses.detach()))
    assert torch.allclose(w.last_weights, grad)


def test_famo_shifts_weight_to_slow_task():
    w = build_weighting("famo", TASKS)
    w(torch.tensor([1.0, 1.0], requires_grad=True))
    assert torch.equal(w.logits, torch.zeros(2))  # no previous loss yet
    losses = torch.tensor([0.5, 1.0], requires_grad=True)  # a halved, b unchanged
    total = w(losses)
    z = torch.softmax(w.logits, dim=0)
    assert z[1] > z[0]
    (grad,) = torch.autograd.grad(total, losses)
    assert torch.allclose(grad, w.last_weights) and torch.isclose(grad.sum(), torch.tensor(1.0))
    with torch.no_grad():  # evaluation does not move the state
        w(torch.tensor([0.1, 5.0]))
    assert torch.equal(torch.softmax(w.logits, dim=0), z)


@pytest.mark.parametrize("name", LOSS_METHODS)
def test_loss_weighting_contract(name):
    torch.manual_seed(0)
    shared = nn.Linear(3, 4)
    heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 2)])
    x, y0, y1 = torch.randn(8, 3), torch.randn(8, 1), torch.randint(0, 2, (8,))

    def losses() -> torch.Tensor:
        h = torch.relu(shared(x))
        return torch.stack([((heads[0](h) - y0) ** 2).mean(), nn.functional.cross_entropy(heads[1](h), y1)])

    w = build_weighting(name, TASKS, [1.0, 0.5])
    w.end_epoch(torch.tensor([1.0, 0.9]))
    w.end_epoch(torch.tensor([0.8, 0.85]))
    opt = torch.optim.SGD([*shared.parameters(), *heads.parameters(), *w.parameters()], lr=0.1)
    for _ in range(2):
        opt.zero_grad()
        total = w(losses(), list(shared.parameters()))
        total.backward()
        opt.step()
        assert total.ndim == 0 and torch.isfinite(total)
        assert w.last_weights.shape == (2,) and torch.isfinite(w.last_weights).all()

    fresh = build_weighting(name, TASKS)
    fresh.load_state_dict(w.state_dict())
    torch.manual_seed(1)
    expected = w(losses(), list(shared.parameters()))
    torch.manual_seed(1)
    got = fresh(losses(), list(shared.parameters()))
    assert torch.equal(got, expected)
    assert torch.equal(fresh.last_weights, w.last_weights)
    assert not math.isnan(got.item())


# --- scale-invariant loss and STCH ------------------------------------------------------------------------------


def _two_task_model():
    torch.manual_seed(0)
    shared, head = nn.Linear(3, 4), nn.Linear(4, 2)
    x, y = torch.randn(16, 3), torch.randn(16, 2)

    def losses(scale=(1.0, 1.0)):
        err = (head(torch.tanh(shared(x))) - y) ** 2
        return torch.stack([scale[0] * err[:, 0].mean(), scale[1] * err[:, 1].mean()])

    return shared, losses


def test_scale_invariant_update_ignores_each_loss_scale():
    """Nash-MTL's SI baseline: d/dtheta sum log(c_t L_t) = sum grad L_t / L_t, whatever the c_t."""
    shared, losses = _two_task_model()
    w = build_weighting("scale_invariant", TASKS)
    grads = []
    for scale in [(1.0, 1.0), (1e-3, 50.0)]:
        (g,) = torch.autograd.grad(w(losses(scale)), shared.weight)
        grads.append(g)
    each = losses()
    by_hand = sum(torch.autograd.grad(each[t], shared.weight, retain_graph=True)[0] / each[t].item() for t in (0, 1))
    assert torch.allclose(grads[0], by_hand, rtol=1e-5, atol=1e-7)
    assert torch.allclose(grads[1], by_hand, rtol=1e-4, atol=1e-7)
    assert torch.allclose(w.last_weights, 1 / losses((1e-3, 50.0)).detach(), rtol=1e-6)


def _stch_by_hand(losses, nadir, mu):
    """T * mu * log sum_t exp(log(L_t / n_t) / mu), in float64 with math."""
    terms = [math.log(loss / n) / mu for loss, n in zip(losses, nadir)]
    top = max(terms)
    return len(losses) * mu * (top + math.log(sum(math.exp(v - top) for v in terms)))


def test_stch_warms_up_on_log_losses_then_takes_the_nadir_of_the_last_warmup_epoch():
    w = build_weighting("stch", ["a", "b", "c"], warmup_epochs=3, mu=0.5)
    losses = torch.tensor([0.5, 2.0, 4.0], requires_grad=True)
    for epoch_means in ([9.0, 9.0, 9.0], [3.0, 1.0, 2.0]):
        assert torch.allclose(w(losses), torch.log(losses).sum())  # warmup: the scale-invariant loss
        w.end_epoch(torch.tensor(epoch_means))
    w.end_epoch(torch.tensor([0.25, 4.0, 1.0]))  # the third, last warmup epoch gives the nadir
    total = w(losses)
    assert math.isclose(total.item(), _stch_by_hand([0.5, 2.0, 4.0], [0.25, 4.0, 1.0], 0.5), rel_tol=1e-6)
    w.end_epoch(torch.tensor([7.0, 7.0, 7.0]))  # later epochs keep it
    assert math.isclose(w(losses).item(), total.item(), rel_tol=1e-7)


def test_stch_gradient_weights_and_its_limits():
    nadir = [1.0, 2.0]
    for mu in (2.0, 1.0, 0.1):
        w = build_weighting("stch", TASKS, warmup_epochs=1, mu=mu)
        w.end_epoch(torch.tensor(nadir))
        losses = torch.tensor([0.7, 3.0], dtype=torch.float32, requires_grad=True)
        (grad,) = torch.autograd.grad(w(losses), losses)
        assert torch.allclose(grad, w.last_weights, rtol=1e-5)
        for t in (0, 1):  # central differences of the by-hand formula
            h = 1e-4
            up = [0.7, 3.0]
            down = [0.7, 3.0]
            up[t] += h
            down[t] -= h
            numeric = (_stch_by_hand(up, nadir, mu) - _stch_by_hand(down, nadir, mu)) / (2 * h)
            assert math.isclose(grad[t].item(), numeric, rel_tol=1e-3), (mu, t)
    # mu -> 0: T * max_t log(L_t / n_t) (the Tchebycheff scalarization), within T * mu * log T
    w = build_weighting("stch", TASKS, warmup_epochs=1, mu=1e-3)
    w.end_epoch(torch.tensor(nadir))
    tcheby = 2 * max(math.log(0.7 / 1.0), math.log(3.0 / 2.0))
    assert abs(w(torch.tensor([0.7, 3.0])).item() - tcheby) <= 2 * 1e-3 * math.log(2) + 1e-5


def test_stch_resumes_its_epoch_count_and_nadir():
    w = build_weighting("stch", TASKS, warmup_epochs=2)
    w.end_epoch(torch.tensor([1.0, 1.0]))
    fresh = build_weighting("stch", TASKS, warmup_epochs=2)
    fresh.load_state_dict(w.state_dict())
    for m in (w, fresh):
        m.end_epoch(torch.tensor([0.5, 2.0]))
    losses = torch.tensor([0.3, 0.9])
    assert torch.equal(fresh.nadir, torch.tensor([0.5, 2.0])) and torch.equal(fresh(losses), w(losses))


@pytest.mark.parametrize("options, message", [({"mu": 0}, "mu must be > 0"), ({"warmup_epochs": 0}, ">= 1")])
def test_stch_bad_options(options, message):
    with pytest.raises(UserError, match=message):
        build_weighting("stch", TASKS, **options)
