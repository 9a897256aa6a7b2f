"""Gradient methods against exact references computed here by brute force (tests/weighting/exact_references.py), over
task counts, norm spreads up to 1e4, correlated and rank-deficient gradients and global scales from 1e-8 to 1e8; and
each method's defining property (min norm, no conflict, the bargaining equation, CAGrad's optimality)."""

import itertools
import math

import exact_references as ref
import pytest
import torch

from mtl.core.errors import UserError
from mtl.weighting import build_weighting, solvers
from mtl.weighting import gradient as gw

torch.set_num_threads(1)

TASKS = (2, 3, 5, 8, 10)
SPREADS = (1.0, 100.0, 1e4)
SCALES = (1e-8, 1.0, 1e8)
DIM = 1000
COSINE = 0.9999


def cases(kinds=ref.KINDS):
    """(T, kind, spread, gradients at scale 1)."""
    for t, kind, spread in itertools.product(TASKS, kinds, SPREADS):
        yield t, kind, spread, ref.random_jacobian(t, DIM, spread, kind, 1.0, seed=t)


def method_direction(name, grads, **options):
    t = grads.shape[0]
    return build_weighting(name, [f"t{i}" for i in range(t)], **options)(grads, torch.ones(t))


def check_against(name, reference_fn, kinds=ref.KINDS, **options):
    worst = (1.0, None)
    for t, kind, spread, base in cases(kinds):
        exact = reference_fn(base)
        largest = float(base.double().norm(dim=1).max())
        for scale in SCALES:
            d, _ = method_direction(name, base * scale, **options)
            value = ref.agreement(d / scale, exact, largest)
            if value < worst[0]:
                worst = (value, (t, kind, spread, scale))
    assert worst[0] >= COSINE, (
        f"{name}: cosine {worst[0]:.6f} with the exact answer at (T, kind, spread, scale) = {worst[1]}"
    )


def test_mgda_is_the_exact_min_norm_point():
    check_against("mgda", lambda g: ref.min_norm_point(g)[1])


def test_mgda_min_norm_optimality_conditions():
    """x = G^T a is the min-norm point of the hull iff a is in the simplex and g_j . x >= |x|^2 for every j."""
    for t, kind, spread, base in cases():
        for scale in SCALES:
            d, w = method_direction("mgda", base * scale)
            g, x, a = (base * scale).double(), d.double(), w.double()
            assert a.min() >= 0 and abs(float(a.sum()) - 1) < 1e-6
            largest = float(g.norm(dim=1).max())
            slack = g @ x - x @ x
            assert float(slack.min()) >= -1e-5 * largest**2, (t, kind, spread, scale)


@pytest.mark.parametrize("c", [0.4, 0.9, 1.5])
def test_cagrad_is_exact(c):
    check_against("cagrad", lambda g: ref.cagrad_direction(g, c)[0], c=c)


def test_cagrad_reaches_the_optimal_worst_task_improvement():
    """Weak duality: min_i g_i . d <= F(w) for every d in the ball and w in the simplex; CAGrad's d (before its
    rescaling) must reach the brute-force minimum of F, and stay in the ball |d - g0| <= c |g0|."""
    c = 0.4
    for t, kind, spread, base in cases():
        _, best = ref.cagrad_direction(base, c)
        d, _ = method_direction("cagrad", base, c=c, rescale=0)
        g = base.double()
        g0 = g.mean(0)
        primal = float((g @ d.double()).min())
        scale = float(g.norm(dim=1).max()) ** 2
        assert primal >= best - 1e-5 * scale, (t, kind, spread, primal, best)
        assert float((d.double() - g0).norm()) <= c * float(g0.norm()) * (1 + 1e-5) + 1e-6 * scale**0.5


def test_cagrad_solver_kkt():
    """The dual's KKT conditions at the solver's w: F's gradient b + r M w / |g_w| is equal on the support and no
    smaller off it (the support found from w > 0)."""
    for t, kind, spread, base in cases(("random", "correlated")):
        m = solvers.host(ref.gram64(base))
        w = solvers.cagrad_weights(m, 0.4)
        b = m.mean(1)
        r = 0.4 * math.sqrt(float(b.mean()))
        s = math.sqrt(float(w @ m @ w))
        grad = b + r * (m @ w) / s
        level = float(w @ grad)
        support = w > 1e-12
        top = float(grad.abs().max())
        assert float((grad[support] - level).abs().max()) <= 1e-8 * top, (t, kind, spread)
        assert float(torch.cat([grad[~support] - level, torch.zeros(1, dtype=grad.dtype)]).min()) >= -1e-8 * top, (
            t,
            kind,
            spread,
        )


def test_upgrad_is_the_exact_mean_projection_onto_the_dual_cone():
    check_against("upgrad", ref.upgrad_direction)


def test_upgrad_never_conflicts_with_any_task():
    for t, kind, spread, base in cases():
        for scale in SCALES:
            grads = base * scale
            d, w = method_direction("upgrad", grads)
            g = grads.double()
            # d is a float32 sum of the terms alpha_i g_i: its rounding (T * 6e-8 of their total length at most)
            # matters only where they cancel, as for opposite gradients, whose dual cone is {0} on span(G)
            terms = float((w.double().abs() * g.norm(dim=1)).sum())
            cos = (g @ d.double()) / (g.norm(dim=1) * terms)
            assert float(cos.min()) >= -1e-6, (t, kind, spread, scale, float(cos.min()))


def test_upgrad_never_conflicts_on_many_random_jacobians():
    """1,500 random cases (norms log-uniform up to a spread of 1e4, a shared component of random weight): the
    fixed-iteration solver this replaced gave a direction against some task's gradient in 2 of them (cos -0.004)."""
    gen = torch.Generator().manual_seed(0)
    worst = 1.0
    for trial in range(1500):
        t = int(torch.randint(2, 11, (1,), generator=gen))
        spread = float(10 ** torch.randint(2, 5, (1,), generator=gen))
        g = torch.randn(t, 500, generator=gen, dtype=torch.float64)
        if trial % 2:
            g = g + torch.randn(1, 500, generator=gen, dtype=torch.float64) * float(torch.rand(1, generator=gen) * 3)
        norms = spread ** torch.rand(t, generator=gen, dtype=torch.float64)
        grads = (g / g.norm(dim=1, keepdim=True) * norms[:, None]).float()
        d, w = method_direction("upgrad", grads)
        gd = grads.double()
        terms = float((w.double().abs() * gd.norm(dim=1)).sum())
        worst = min(worst, float(((gd @ d.double()) / (gd.norm(dim=1) * terms)).min()))
    assert worst >= -1e-6, worst


def test_aligned_mtl_matches_the_svd():
    check_against("aligned_mtl", ref.aligned_direction)


def test_imtl_g_equal_projections_everywhere():
    """IMTL-G is defined when the gradients are linearly independent (its system is singular otherwise)."""
    for t, kind, spread, base in cases(("random", "correlated")):
        for scale in SCALES:
            grads = base * scale
            d, w = method_direction("imtl_g", grads)
            g = grads.double()
            proj = (g / g.norm(dim=1, keepdim=True)) @ d.double()
            assert abs(float(w.sum()) - 1) < 1e-5
            assert float((proj - proj.mean()).abs().max()) <= 1e-4 * float(proj.abs().max()), (t, kind, spread, scale)


def test_nash_mtl_solves_the_bargaining_equation():
    """alpha_i (G G^T alpha)_i = 1 with alpha > 0 (linearly independent gradients: otherwise it may have no
    solution). The weights are float32: the residual is measured at float32's resolution."""
    for t, kind, spread, base in cases(("random", "correlated")):
        for scale in SCALES:
            grads = base * scale
            _, w = method_direction("nash_mtl", grads)
            a = w.double()
            assert (a > 0).all()
            residual = a * (ref.gram64(grads) @ a) - 1
            assert float(residual.abs().max()) < 1e-5, (t, kind, spread, scale, float(residual.abs().max()))


@pytest.mark.parametrize("name", ["pcgrad", "gradvac"])
def test_surgery_does_not_depend_on_the_gradients_scale(name):
    """The papers' sequential loop in float64 on the unscaled gradients, against the method on tiny and huge ones."""
    adjust = {"pcgrad": ref.pcgrad_projection}
    for t, kind, spread, base in cases():
        for scale in SCALES:
            order = gw._other_tasks_in_random_order(t, base.device, build_weighting(name, ["t"] * t).generator())
            if name == "pcgrad":
                exact = ref.surgery_reference(base, order, adjust["pcgrad"])
            else:  # a fresh GradVac has targets 0: each conflicting pair is made orthogonal
                exact = ref.surgery_reference(
                    base, order, lambda i, j, p, gj: p - min(float(p @ gj), 0.0) / float(gj @ gj) * gj
                )
            d, _ = method_direction(name, base * scale)
            largest = float(base.double().norm(dim=1).max())
            assert ref.agreement(d / scale, exact, largest) >= COSINE, (name, t, kind, spread, scale)
            assert float((d.double() / scale - exact).norm()) <= 1e-4 * float(exact.norm()) + 1e-5 * largest


def test_pcgrad_projects_tiny_gradients():
    """Late in training gradients are small: an absolute floor on squared norms used to switch projections off."""
    g1, g2 = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-2.0, 0.5, 1.0])
    for scale in (1e-7, 1e-12, 1e-20):
        d, _ = method_direction("pcgrad", torch.stack([g1, g2]) * scale)
        p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
        p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
        assert torch.allclose(d / scale, p1 + p2, atol=1e-5)


def test_a_large_gradient_dimension():
    """D = 100,000 at a spread of 1e4: MGDA, CAGrad and UPGrad still match."""
    base = ref.random_jacobian(6, 100_000, 1e4, "correlated", 1.0, seed=1)
    largest = float(base.double().norm(dim=1).max())
    for name, exact in (
        ("mgda", ref.min_norm_point(base)[1]),
        ("cagrad", ref.cagrad_direction(base, 0.4)[0]),
        ("upgrad", ref.upgrad_direction(base)),
    ):
        d, _ = method_direction(name, base)
        assert ref.agreement(d, exact, largest) >= COSINE, name


@pytest.mark.parametrize("simplex", [False, True])
def test_active_set_qp_meets_the_kkt_conditions(simplex):
    """Random convex QPs, singular ones included: x feasible, and the (reduced) gradient is zero on the support and
    non-negative off it, which certifies the minimum of a convex problem."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        t = 2 + trial % 9
        rank = t if trial % 3 else max(1, t // 2)
        a = torch.randn(t, rank, generator=gen, dtype=torch.float64) * (
            10.0 ** torch.randn(t, 1, generator=gen, dtype=torch.float64)
        )
        h = a @ a.T
        h = h / h.diagonal().max()
        q = torch.randn(4, t, generator=gen, dtype=torch.float64)
        if not simplex:  # bounded below over x >= 0 only if q is in H's range
            q = q @ h
        x = solvers.active_set_qp(h, q, simplex=simplex)
        assert (x >= 0).all()
        grad = x @ h + q
        if simplex:
            assert torch.allclose(x.sum(1), torch.ones(4, dtype=torch.float64))
            grad = grad - (x * grad).sum(1, keepdim=True)
        top = float(grad.abs().max()) + 1
        support = x > 0
        assert float(torch.cat([grad[support].abs(), torch.zeros(1, dtype=grad.dtype)]).max()) <= 1e-9 * top, trial
        assert float(torch.cat([grad[~support], torch.zeros(1, dtype=grad.dtype)]).min()) >= -1e-9 * top, trial


def test_zero_and_single_gradients_stay_finite():
    for name in ("mgda", "cagrad", "upgrad", "imtl_g", "nash_mtl", "aligned_mtl", "pcgrad", "gradvac"):
        for grads in (torch.zeros(3, 7), torch.randn(1, 7), torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])):
            d, w = method_direction(name, grads)
            assert torch.isfinite(d).all() and torch.isfinite(w).all(), name


def test_dualproj_is_the_exact_projection_of_the_mean_onto_the_dual_cone():
    check_against("dualproj", ref.dualproj_direction)


def test_dualproj_never_conflicts_and_keeps_a_harmless_mean():
    for t, kind, spread, base in cases():
        d, w = method_direction("dualproj", base)
        g = base.double()
        terms = float((w.double().abs() * g.norm(dim=1)).sum())
        assert float(((g @ d.double()) / (g.norm(dim=1) * terms)).min()) >= -1e-6, (t, kind, spread)
    grads = torch.tensor([[1.0, 0.0, 0.0], [0.6, 0.8, 0.0], [0.0, 1.0, 0.5]])  # the mean conflicts with none
    d, w = method_direction("dualproj", grads)
    assert torch.allclose(d, grads.mean(0), atol=1e-7) and torch.allclose(w, torch.full((3,), 1 / 3))


def test_config_matches_its_definition_in_the_gradients_space():
    check_against("config", ref.config_direction)


def test_config_has_the_same_cosine_with_every_task():
    for t, kind, spread, base in cases(("random", "correlated")):
        for scale in SCALES:
            d, _ = method_direction("config", base * scale)
            g = base.double()
            cos = (g @ d.double()) / (g.norm(dim=1) * d.double().norm())
            assert float(cos.min()) > 0 and float(cos.max() - cos.min()) <= 1e-5, (t, kind, spread, scale)


def test_config_by_hand():
    # orthogonal: e = (1, 1) / sqrt(2), sum of projections (1 + 2) / sqrt(2), so d = (1.5, 1.5)
    d, w = method_direction("config", torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
    assert torch.allclose(d, torch.tensor([1.5, 1.5])) and torch.allclose(w, torch.tensor([1.5, 0.75]))
    d, w = method_direction("config", torch.tensor([[3.0, 0.0], [-1.0, 0.0]]))  # opposed: no common direction
    assert torch.equal(d, torch.zeros(2)) and torch.equal(w, torch.zeros(2))


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
def test_fairgrad_solves_its_fairness_equation(alpha):
    """(G G^T w)_i = w_i^(-1/alpha) with w > 0 (linearly independent gradients: otherwise it may have no solution),
    measured at the float32 weights' resolution."""
    for t, kind, spread, base in cases(("random", "correlated")):
        for scale in SCALES:
            grads = base * scale
            _, w = method_direction("fairgrad", grads, alpha=alpha)
            a = w.double()
            assert (a > 0).all()
            target = a ** (-1 / alpha)
            residual = (ref.gram64(grads) @ a - target) / target
            assert float(residual.abs().max()) < 1e-5, (t, kind, spread, scale, float(residual.abs().max()))


def test_fairgrad_by_hand_and_at_alpha_one():
    # orthogonal gradients of norms n_i: n_i^2 w_i = w_i^(-1/alpha), so w_i = n_i^(-2 alpha / (alpha + 1))
    norms = torch.tensor([0.5, 2.0, 30.0])
    grads = torch.diag(norms)
    for alpha in (0.5, 1.0, 3.0):
        _, w = method_direction("fairgrad", grads, alpha=alpha)
        assert torch.allclose(w, norms ** (-2 * alpha / (alpha + 1)), rtol=1e-6)
    for t, kind, spread, base in cases(("random", "correlated")):  # alpha = 1 is Nash-MTL's bargaining equation
        d, _ = method_direction("fairgrad", base, alpha=1.0)
        nash, _ = method_direction("nash_mtl", base)
        assert ref.cosine(d, nash) > 1 - 1e-9 and math.isclose(d.norm(), nash.norm(), rel_tol=1e-5), (t, kind, spread)


def test_fairgrad_bad_alpha():
    from mtl.core.errors import UserError

    with pytest.raises(UserError, match="alpha must be > 0"):
        build_weighting("fairgrad", ["a", "b"], alpha=0)


def _three_batches(steps, t, d=6, seed=0):
    """``steps`` draws of three batches' task gradients (3, T, D), with task norms spread over 50x."""
    gen = torch.Generator().manual_seed(seed)
    norms = torch.tensor([1.0, 7.0, 0.3, 2.0, 50.0])[:t, None]
    return [torch.randn(3, t, d, generator=gen) * norms + 0.5 * torch.randn(d, generator=gen) for _ in range(steps)]


def _run_steps(name, batches, **options):
    method = build_weighting(name, [f"t{i}" for i in range(batches[0].shape[1])], **options)
    return [method(g, torch.ones(3, g.shape[1])) + (method.last_weights.clone(),) for g in batches], method


@pytest.mark.parametrize("t", [2, 3, 5])
def test_modo_follows_its_update_step_by_step(t):
    """lambda <- Pi(lambda - gamma (G_1 G_2^T lambda + rho lambda)), d = G_3^T lambda, against a float64 loop on the
    gradient vectors; gamma large enough that the projection clips weights to 0."""
    batches = _three_batches(4, t, seed=t)
    got, method = _run_steps("modo", batches, gamma=0.05, rho=0.1)
    clipped = False
    for k, ((d, w, logged), (lam, exact)) in enumerate(zip(got, ref.modo_steps(batches, 0.05, 0.1))):
        assert torch.allclose(w.double(), lam, atol=1e-6) and torch.equal(w, logged), k
        assert float((d.double() - exact).norm()) <= 1e-5 * float(batches[k].norm()), k
        clipped |= bool((lam == 0).any())
    assert clipped
    assert torch.allclose(method.lam.double(), lam, atol=1e-6)


def test_modo_by_hand():
    """T = 2, G_1 = G_2 = diag(1, 2): G_1 G_2^T lambda = (0.5, 2) at lambda = (0.5, 0.5); with gamma 0.1 and rho 0,
    (0.45, 0.3) projects to (0.575, 0.425), and d = G_3^T lambda."""
    g = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    d, w = build_weighting("modo", ["a", "b"], gamma=0.1, rho=0.0)(torch.stack([g, g, 3 * g]), torch.ones(3, 2))
    assert torch.allclose(w, torch.tensor([0.575, 0.425])) and torch.allclose(d, torch.tensor([1.725, 2.55]))


@pytest.mark.parametrize("t", [3, 5])
def test_sdmgrad_follows_its_update_step_by_step(t):
    """niter heavy-ball steps of projected SGD on w along G_1 (G_2^T w + lamda g_0(2)) / s^2, then
    d = G_3^T (w + lamda / T) / (1 + lamda), against a float64 loop on the gradient vectors, for LibMTL's options and
    others; w carries over between steps."""
    batches = _three_batches(3, t, seed=10 + t)
    for options in ({}, {"lamda": 0.0, "niter": 3, "lr": 0.5, "momentum": 0.0}, {"lamda": 2.0, "niter": 7}):
        got, method = _run_steps("sdmgrad", batches, **options)
        full = {"lamda": 0.3, "niter": 20, "lr": 5.0, "momentum": 0.5, **options}
        for k, ((d, w, logged), (c, exact)) in enumerate(zip(got, ref.sdmgrad_steps(batches, **full))):
            assert torch.allclose(w.double(), c, atol=1e-5) and torch.equal(w, logged), (options, k)
            assert abs(float(w.sum()) - 1) < 1e-6 and float(w.min()) >= full["lamda"] / t / (1 + full["lamda"]) - 1e-7
            assert float((d.double() - exact).norm()) <= 1e-5 * float(batches[k].norm()), (options, k)


@pytest.mark.parametrize("lamda", [0.0, 0.3, 3.0])
def test_sdmgrad_solves_the_direction_oriented_problem_with_one_batch(lamda):
    """Given the same batch three times, enough small steps reach argmin_{w in simplex} |G^T w + lamda g_0|^2 / 2 (the
    paper's subproblem, by brute force over supports): d = (G^T w* + lamda g_0) / (1 + lamda). lamda = 0 is MGDA."""
    gen = torch.Generator().manual_seed(1)
    grads = torch.randn(3, 8, generator=gen) * torch.tensor([[1.0], [4.0], [0.5]]) + torch.randn(8, generator=gen)
    method = build_weighting("sdmgrad", ["a", "b", "c"], lamda=lamda, niter=300, lr=0.2, momentum=0.5)
    d, _ = method(grads.expand(3, 3, 8), torch.ones(3, 3))
    w = ref.direction_oriented_weights(grads, lamda)
    assert torch.allclose(method.weights.double(), w, atol=1e-5)
    exact = (w @ grads.double() + lamda * grads.double().mean(0)) / (1 + lamda)
    assert float((d.double() - exact).norm()) <= 1e-5 * float(grads.norm())
    if lamda == 0.0:
        assert torch.allclose(d.double(), ref.min_norm_point(grads)[1], atol=1e-5)


def test_sdmgrad_weights_are_scale_free_and_modo_steps_are_not():
    """SDMGrad divides G_1 G_2^T by its scale: the same weights at 1e-6 and 1e6; MoDo's step is gamma G_1 G_2^T, as in
    its paper, so tiny gradients leave lambda at 1/T."""
    (g,) = _three_batches(1, 3)
    ws = [build_weighting("sdmgrad", ["a", "b", "c"])(g * s, torch.ones(3, 3))[1] for s in (1e-6, 1.0, 1e6)]
    assert torch.allclose(ws[0], ws[1], atol=1e-6) and torch.allclose(ws[2], ws[1], atol=1e-6)
    _, w = build_weighting("modo", ["a", "b", "c"])(g * 1e-6, torch.ones(3, 3))
    assert torch.allclose(w, torch.full((3,), 1 / 3), atol=1e-6)


def test_three_sample_methods_refuse_bad_options_and_shapes():
    for name, options, message in (
        ("modo", {"gamma": -1.0}, "gamma must be a number >= 0 for modo"),
        ("modo", {"rho": "x"}, "rho must be a number"),
        ("sdmgrad", {"niter": 0}, "niter must be an integer >= 1"),
        ("sdmgrad", {"momentum": 1.0}, r"momentum must be a number in \[0, 1\)"),
        ("sdmgrad", {"lamda": float("nan")}, "lamda must be a number >= 0"),
    ):
        with pytest.raises(UserError, match=message):
            build_weighting(name, ["a", "b"], **options)
    with pytest.raises(ValueError, match=r"takes \(3, 2, D\) gradients"):
        build_weighting("modo", ["a", "b"])(torch.randn(2, 5), torch.ones(2))
