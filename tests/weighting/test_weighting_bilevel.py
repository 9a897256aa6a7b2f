"""Auto-Lambda and the bilevel hook: the finite-difference hypergradient against autograd through an explicit,
differentiable virtual step written here with plain tensor operations; the Adam update of the weights step by step
against torch.optim.Adam; the meta computation leaves the model's buffers and the global random state alone."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mtl.core.errors import UserError
from mtl.weighting import build_weighting
from mtl.weighting.bilevel import MetaProblem

pytestmark = pytest.mark.usefixtures("one_thread")

TASKS = ["a", "b"]
LOSSES = {"a": lambda out, y: ((out.squeeze(1) - y) ** 2).mean(), "b": lambda out, y: ((out - y) ** 2).mean()}


class Linear(nn.Module):
    """Outputs linear in every parameter, so squared errors are quadratic in them: the central difference is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.shared, self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 1), nn.Linear(3, 2)

    def forward(self, x):
        s = self.shared(x)
        return {"a": s.sum(1, keepdim=True) + self.a(x), "b": s + self.b(x)}


def linear_by_hand(p, x):
    s = x @ p["shared.weight"].T + p["shared.bias"]
    return {"a": s.sum(1, keepdim=True) + x @ p["a.weight"].T + p["a.bias"], "b": s + x @ p["b.weight"].T + p["b.bias"]}


class Nonlinear(nn.Module):
    """BatchNorm (its running statistics must stay as they are), tanh and dropout (the same masks in every forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(3, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Dropout(0.3))
        self.a, self.b = nn.Linear(5, 1), nn.Linear(5, 2)

    def forward(self, x):
        h = self.body(x)
        return {"a": self.a(h), "b": self.b(h)}


def nonlinear_by_hand(p, x):
    h = F.linear(x, p["body.0.weight"], p["body.0.bias"])
    h = F.batch_norm(h, None, None, p["body.1.weight"], p["body.1.bias"], training=True, eps=1e-5)
    h = F.dropout(torch.tanh(h), 0.3, training=True)
    return {"a": F.linear(h, p["a.weight"], p["a.bias"]), "b": F.linear(h, p["b.weight"], p["b.bias"])}


def _batch(n=8):
    return torch.randn(n, 3, dtype=torch.float64), {
        "a": torch.randn(n, dtype=torch.float64),
        "b": torch.randn(n, 2, dtype=torch.float64),
    }


def _setup(cls, seed=0):
    """A float64 model whose optimizer has two groups (different lr, momentum buffers, weight decay on one)."""
    torch.manual_seed(seed)
    model = cls().double().train()
    heads = [p for n, p in model.named_parameters() if n[0] in "ab"]
    body = [p for n, p in model.named_parameters() if n[0] not in "ab"]
    opt = torch.optim.SGD([{"params": body, "lr": 0.3, "weight_decay": 0.01}, {"params": heads}], lr=0.1, momentum=0.9)
    x, y = _batch()
    out = model(x)
    sum(LOSSES[t](out[t], y[t]) for t in TASKS).backward()
    opt.step()  # momentum buffers exist now
    opt.zero_grad(set_to_none=True)
    return model, opt


def reference_hypergradient(model, opt, by_hand, lam, train, meta, primary=(1.0, 1.0), rng=None):
    """d L_meta(theta'(lam); meta) / d lam by autograd through theta' = theta - lr (mu b + g(lam) + wd theta),
    g(lam) = grad sum_t lam_t L_t(theta; train) kept differentiable (create_graph)."""
    lam = lam.detach().clone().requires_grad_()
    theta = dict(model.named_parameters())

    def task_losses(params, batch):
        if rng is not None:  # dropout: the masks of the step's random state, in every forward
            torch.set_rng_state(rng)
        out = by_hand(params, batch[0])
        return torch.stack([LOSSES[t](out[t], batch[1][t]) for t in TASKS])

    names = list(theta)
    grads = torch.autograd.grad((lam * task_losses(theta, train)).sum(), [theta[n] for n in names], create_graph=True)
    lr_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    virtual = {}
    for n, g in zip(names, grads):
        p, group = theta[n], lr_of[id(theta[n])]
        momentum = group["momentum"] * opt.state[p]["momentum_buffer"]
        virtual[n] = p - group["lr"] * (momentum + g + group["weight_decay"] * p)
    meta_loss = (torch.tensor(primary, dtype=torch.float64) * task_losses(virtual, meta)).sum()
    (hyper,) = torch.autograd.grad(meta_loss, lam)
    return hyper


def _hypergradient(w, model, opt, train, meta):
    with MetaProblem(model, LOSSES, opt, train, meta) as problem:
        return w.hypergradient(problem)


def test_hypergradient_is_exact_for_losses_quadratic_in_the_parameters():
    model, opt = _setup(Linear)
    train, meta = _batch(), _batch()
    for primary in (None, ["b"]):
        w = build_weighting("auto_lambda", TASKS, init=0.7, primary=primary).double()
        w.loss_weights.copy_(torch.tensor([0.7, 1.3]))
        got = _hypergradient(w, model, opt, train, meta)
        mask = (1.0, 1.0) if primary is None else (0.0, 1.0)
        want = reference_hypergradient(model, opt, linear_by_hand, w.loss_weights, train, meta, mask)
        assert want.abs().min() > 1e-4  # something to compare
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_hypergradient_on_batchnorm_and_dropout_within_the_central_difference_error():
    """eps * ||lr d|| = 0.01: the central difference is off by O(eps^2) in the third derivatives, 1e-3 relative
    here; BatchNorm's running statistics and the global random state are as before."""
    model, opt = _setup(Nonlinear)
    train, meta = _batch(), _batch()
    w = build_weighting("auto_lambda", TASKS).double()
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    rng = torch.get_rng_state()
    got = _hypergradient(w, model, opt, train, meta)
    assert torch.equal(torch.get_rng_state(), rng)
    for n, b in model.named_buffers():
        assert torch.equal(b, buffers[n]), n
    want = reference_hypergradient(model, opt, nonlinear_by_hand, w.loss_weights, train, meta, rng=rng)
    torch.testing.assert_close(got, want, rtol=3e-3, atol=0.0)
    torch.rand(10)
    other = reference_hypergradient(model, opt, nonlinear_by_hand, w.loss_weights, train, meta, rng=None)
    assert not torch.allclose(other, want, rtol=3e-2)  # other dropout masks: the comparison above is sensitive to them


def test_weights_take_adam_steps_on_the_hypergradient_step_by_step():
    """The weights after each meta step (with a real training step in between, as in the trainer) equal
    torch.optim.Adam's on the reference hypergradient; the trained model uses the updated weights."""
    model, opt = _setup(Linear)
    w = build_weighting("auto_lambda", TASKS, init=0.5, lr=0.02).double()
    lam = torch.full((2,), 0.5, dtype=torch.float64, requires_grad=True)
    adam = torch.optim.Adam([lam], lr=0.02)
    for step in range(4):
        train, meta = _batch(), _batch()
        lam.grad = reference_hypergradient(model, opt, linear_by_hand, lam, train, meta)
        adam.step()
        with MetaProblem(model, LOSSES, opt, train, meta) as problem:
            w.meta_step(problem)
        torch.testing.assert_close(w.loss_weights, lam.detach(), rtol=1e-10, atol=1e-12)
        out = model(train[0])
        total = w(torch.stack([LOSSES[t](out[t], train[1][t]) for t in TASKS]))
        assert torch.equal(w.last_weights, w.loss_weights)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert (w.loss_weights - 0.5).abs().min() > 0.01  # they moved
    assert int(w.adam_step) == 4


def test_nonfinite_hypergradient_leaves_the_weights_and_nonnegative_clamps():
    model, opt = _setup(Linear)
    train, meta = _batch(), _batch()
    w = build_weighting("auto_lambda", TASKS).double()
    before = {k: v.clone() for k, v in w.state_dict().items() if isinstance(v, torch.Tensor)}
    bad = (meta[0], {"a": meta[1]["a"] * float("nan"), "b": meta[1]["b"]})
    with MetaProblem(model, LOSSES, opt, train, bad) as problem:
        w.meta_step(problem)
    for k, v in w.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    free = build_weighting("auto_lambda", TASKS, init=-0.015, lr=0.01).double()
    clamped = build_weighting("auto_lambda", TASKS, init=-0.015, lr=0.01, nonnegative=True).double()
    for m in (free, clamped):
        with MetaProblem(model, LOSSES, opt, train, meta) as problem:
            m.meta_step(problem)
    assert (free.loss_weights < 0).any()
    torch.testing.assert_close(clamped.loss_weights, free.loss_weights.clamp_min(0.0))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"primary": ["a", "c"]}, "must list tasks among a, b"),
        ({"primary": []}, "must list tasks among a, b"),
        ({"lr": 0.0}, "lr must be > 0"),
        ({"init": float("nan")}, "init must be a finite number"),
    ],
)
def test_bad_options_are_one_line_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_weighting("auto_lambda", TASKS, **options)


def test_frozen_model_is_refused():
    model, _ = _setup(Linear)
    for p in model.parameters():
        p.requires_grad_(False)
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)  # trains nothing of the model
    with pytest.raises(UserError, match="needs trainable model parameters"):
        MetaProblem(model, LOSSES, opt, _batch(), _batch())


def test_virtual_step_is_the_sgd_step_the_optimizer_would_take_plus_l2sp():
    """Without dampening or Nesterov, ``theta - lr (mu b + g + wd theta)`` is torch.optim.SGD's step; L2-SP's
    gradient ``alpha (theta - theta_0)`` joins ``g`` for the encoder's parameters."""
    import copy

    from mtl.models.freezing import L2SP

    model, opt = _setup(Linear)
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    with MetaProblem(model, LOSSES, opt, _batch(), _batch()) as problem:
        virtual = problem.virtual_step(grads)
    twin, twin_opt = copy.deepcopy((model, opt))
    for n, p in twin.named_parameters():
        p.grad = grads[n].clone()
    twin_opt.step()
    for n, p in twin.named_parameters():
        torch.testing.assert_close(virtual[n], p, rtol=1e-12, atol=1e-12)
        assert virtual[n].requires_grad and virtual[n].grad_fn is None
    l2sp = L2SP(model.shared, alpha=0.5)
    with torch.no_grad():
        model.shared.weight.add_(0.25)
    with MetaProblem(model, LOSSES, opt, _batch(), _batch(), l2sp) as problem:
        with_l2sp = problem.virtual_step(grads)
        plain = MetaProblem(model, LOSSES, opt, _batch(), _batch()).virtual_step(grads)
    lr = opt.param_groups[0]["lr"]
    torch.testing.assert_close(with_l2sp["shared.weight"], plain["shared.weight"] - lr * 0.5 * 0.25)
    torch.testing.assert_close(with_l2sp["a.weight"], plain["a.weight"])
