"""ExcessMTL and GradDrop against references written here: a step-by-step float64 loop of ExcessMTL's updates, a
per-position loop of GradDrop's purity and masks, and cases worked out by hand."""

import math

import pytest
import torch

from mtl.core.errors import UserError
from mtl.weighting import build_weighting

torch.set_num_threads(1)

TASKS2, TASKS3 = ["a", "b"], ["a", "b", "c"]


def excess_mtl_reference(steps, eta, warmup):
    """(alpha, d) after each step, in float64: E_t = sum_k g_tk^2 / sqrt(S_tk + 1e-7) with S the sum of squares so
    far; uniform weights while E^0 (the mean E of the first ``warmup`` steps) is gathered, then alpha_t <- alpha_t
    exp(eta E_t / E^0_t) divided by its sum."""
    t, dim = steps[0].shape
    sums = torch.zeros(t, dim, dtype=torch.float64)
    alpha = [1.0 / t] * t
    first = []
    out = []
    for k, grads in enumerate(steps, start=1):
        g = grads.double()
        sums += g**2
        risks = [float((g[i] ** 2 / torch.sqrt(sums[i] + 1e-7)).sum()) for i in range(t)]
        if k <= warmup:
            first.append(risks)
        else:
            initial = [sum(r[i] for r in first) / warmup for i in range(t)]
            alpha = [alpha[i] * math.exp(eta * risks[i] / initial[i]) for i in range(t)]
            alpha = [a / sum(alpha) for a in alpha]
        a = torch.tensor(alpha, dtype=torch.float64)
        out.append((a, a @ g))
    return out


@pytest.mark.parametrize("warmup", [1, 2])
def test_excess_mtl_matches_a_step_by_step_loop_and_resumes_exactly(warmup):
    torch.manual_seed(0)
    scales = torch.tensor([[1.0], [5.0], [0.2]])
    steps = [torch.randn(3, 6) * scales for _ in range(5)]
    eta = 0.5  # large enough that the weights move visibly in a few steps
    expected = excess_mtl_reference(steps, eta, warmup)
    method = build_weighting("excess_mtl", TASKS3, robust_step_size=eta, warmup_steps=warmup)
    for k, (grads, (alpha, d_ref)) in enumerate(zip(steps, expected)):
        if k == 3:  # a checkpoint mid-run continues exactly
            fresh = build_weighting("excess_mtl", TASKS3, robust_step_size=eta, warmup_steps=warmup)
            fresh.load_state_dict(method.state_dict())
            method = fresh
        d, w = method(grads, torch.ones(3))
        assert torch.allclose(w.double(), alpha, atol=1e-6), k
        assert torch.allclose(method.last_weights, w) and torch.allclose(d.double(), d_ref, atol=1e-5), k
    assert float((expected[-1][0] - 1 / 3).abs().max()) > 1e-2  # the weights did move


def test_excess_mtl_by_hand():
    """T = 2, D = 1. Step 1: g = (1, 2), S = (1, 4), E^0 = (1/1, 4/2) = (1, 2); weights stay (1/2, 1/2). Step 2:
    g = (1, 0), S = (2, 4), E = (1/sqrt(2), 0), E / E^0 = (1/sqrt(2), 0); with eta = sqrt(2) ln 3 the factors are
    (3, 1): alpha = (3/4, 1/4), d = 3/4 * 1 + 1/4 * 0."""
    method = build_weighting("excess_mtl", TASKS2, robust_step_size=math.sqrt(2) * math.log(3))
    d, w = method(torch.tensor([[1.0], [2.0]]), torch.ones(2))
    assert torch.allclose(w, torch.tensor([0.5, 0.5])) and torch.allclose(d, torch.tensor([1.5]))
    assert torch.allclose(method.initial, torch.tensor([1.0, 2.0]), atol=1e-6)
    d, w = method(torch.tensor([[1.0], [0.0]]), torch.ones(2))
    assert torch.allclose(w, torch.tensor([0.75, 0.25]), atol=1e-6) and torch.allclose(d, torch.tensor([0.75]))


def test_excess_mtl_starts_over_when_the_shared_parameters_change():
    method = build_weighting("excess_mtl", TASKS2, robust_step_size=1.0)
    for _ in range(3):
        method(torch.tensor([[1.0, 0.0], [0.0, 3.0]]), torch.ones(2))
    weights = method.alpha.clone()
    method(torch.ones(2, 5), torch.ones(2))  # unfrozen layers: more parameters, a new baseline, the weights kept
    assert method.squares.shape == (2, 5) and torch.equal(method.alpha, weights)
    assert torch.allclose(method.initial, torch.full((2,), 5.0), atol=1e-5)  # 5 coordinates of 1 / sqrt(1)


def test_excess_mtl_bad_options():
    for options, message in (({"robust_step_size": 0.0}, "robust_step_size"), ({"warmup_steps": 0}, "warmup_steps")):
        with pytest.raises(UserError, match=message):
            build_weighting("excess_mtl", TASKS2, **options)


def graddrop(tasks, representation, **options):
    method = build_weighting("graddrop", tasks, **options)
    method.representation = representation
    return method


def graddrop_reference(grads, representation, draws, leak=0.0):
    """d in float64, one feature position at a time: G_i = sum over the batch of sign(a) * g_i; P = (1 + sum_i G_i /
    sum_i |G_i|) / 2 (1/2 when all G_i are 0); task i's gradient kept at that position for every batch item when
    (P > U and G_i > 0) or (P < U and G_i < 0), else scaled by ``leak``. ``draws`` gives U for each tensor."""
    t = grads.shape[0]
    out, offset = [], 0
    for a, u in zip(representation, draws):
        batch, positions = a.shape[0], a[0].numel()
        g = grads[:, offset : offset + a.numel()].double().reshape(t, batch, positions)
        offset += a.numel()
        signs = a.reshape(batch, positions).double().sign()
        d = torch.zeros(batch, positions, dtype=torch.float64)
        for p in range(positions):
            sep = [float((signs[:, p] * g[i, :, p]).sum()) for i in range(t)]
            total = sum(abs(s) for s in sep)
            purity = 0.5 * (1 + sum(sep) / total) if total > 0 else 0.5
            for i in range(t):
                kept = (purity > u[p] and sep[i] > 0) or (purity < u[p] and sep[i] < 0)
                d[:, p] += (1.0 if kept else leak) * g[i, :, p]
        out.append(d.reshape(-1))
    return torch.cat(out)


@pytest.mark.parametrize("leak", [0.0, 0.3])
def test_graddrop_matches_a_per_position_loop(leak):
    torch.manual_seed(0)
    representation = [torch.randn(2, 2, 3), torch.randn(2, 4)]  # two feature tensors, batch 2
    grads = torch.randn(3, 2 * 6 + 2 * 4)
    method = graddrop(TASKS3, representation, leak=leak)
    generator = build_weighting("graddrop", TASKS3).generator()  # a fresh method's first draw
    draws = [torch.rand(6, generator=generator).tolist(), torch.rand(4, generator=generator).tolist()]
    d, w = method(grads, torch.ones(3))
    assert torch.allclose(d.double(), graddrop_reference(grads, representation, draws, leak), atol=1e-6)
    assert torch.equal(w, torch.ones(3)) and torch.equal(method.last_weights, torch.ones(3))
    assert not torch.allclose(d, grads.sum(0))  # something was dropped, so the check above means something


def test_graddrop_extremes_whatever_the_draws():
    torch.manual_seed(0)
    positive = torch.rand(3, 2 * 32) + 0.1
    for sign in (1.0, -1.0):  # every G_i of one sign (P = 1 or 0): nothing is dropped
        method = graddrop(TASKS3, [sign * (torch.rand(2, 32) + 0.1)])
        assert torch.allclose(method(positive, torch.ones(3))[0], positive.sum(0))
    g = torch.randn(64)
    method = graddrop(TASKS2, [torch.rand(1, 64) + 0.1])
    d, _ = method(torch.stack([g, -g]), torch.ones(2))  # exactly opposed: P = 1/2, exactly one of the two survives
    assert torch.equal(d.abs(), g.abs()) and (d == g).any() and (d == -g).any()
    # batch-separated: a = (1, -1) makes task 1's G = 1 - 1 = 0 (dropped) and task 2's G = 2 - 1 = 1, so P = 1
    method = graddrop(TASKS2, [torch.tensor([[1.0], [-1.0]])])
    d, _ = method(torch.tensor([[1.0, 1.0], [2.0, 1.0]]), torch.ones(2))
    assert torch.equal(d, torch.tensor([2.0, 1.0]))


def test_graddrop_needs_the_representation_and_a_sane_leak():
    with pytest.raises(UserError, match="grad_on=representation"):
        build_weighting("graddrop", TASKS2)(torch.randn(2, 8), torch.ones(2))
    with pytest.raises(UserError, match="grad_on=representation"):  # a stale representation of another size
        graddrop(TASKS2, [torch.randn(2, 3)])(torch.randn(2, 8), torch.ones(2))
    with pytest.raises(UserError, match="leak"):
        build_weighting("graddrop", TASKS2, leak=1.5)
