"""Gradient-level weightings: each method's defining property on hand-made gradients, plus the contract."""

import math

import pytest
import torch

from mtl.core.errors import UserError
from mtl.weighting import WEIGHTINGS, build_weighting, solvers
from mtl.weighting import gradient as gw

torch.set_num_threads(1)

GRADIENT_METHODS = [n for n in WEIGHTINGS.names() if getattr(WEIGHTINGS.get(n), "gradient_level", False)]
TASKS2, TASKS3 = ["a", "b"], ["a", "b", "c"]


def G(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def run(name, grads, losses=None, **options):
    method = build_weighting(name, [f"t{i}" for i in range(grads.shape[0])], **options)
    d, w = method(grads, torch.ones(grads.shape[0]) if losses is None else losses)
    return d, w, method


def test_all_methods_registered():
    expected = {"mgda", "pcgrad", "gradvac", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl", "upgrad"}
    assert expected <= set(GRADIENT_METHODS)


def test_mgda_min_norm_point():
    _, w, _ = run("mgda", G([1, 0], [0, 1]))
    assert torch.allclose(w, torch.tensor([0.5, 0.5]), atol=1e-6)
    d, w, _ = run("mgda", G([1, 0], [0, 2]))
    assert torch.allclose(w, torch.tensor([0.8, 0.2]), atol=1e-6)
    assert torch.allclose(d, torch.tensor([0.8, 0.4]), atol=1e-6)
    _, w, _ = run("mgda", G([1, 0], [0, 2]), normalization="l2")  # unit gradients: equal weights
    assert torch.allclose(w, torch.tensor([0.5, 0.5]), atol=1e-6)
    # loss normalisation: (0, 2) / 2 = (0, 1) -> equal weights; (0, 2) / 0.5 = (0, 4) -> 16/17, 1/17
    _, w, _ = run("mgda", G([1, 0], [0, 2]), losses=torch.tensor([1.0, 2.0]), normalization="loss")
    assert torch.allclose(w, torch.tensor([0.5, 0.5]), atol=1e-6)
    _, w, _ = run("mgda", G([1, 0], [0, 2]), losses=torch.tensor([1.0, 0.5]), normalization="loss")
    assert torch.allclose(w, torch.tensor([16 / 17, 1 / 17]), atol=1e-6)


def test_mgda_kkt_three_tasks():
    torch.manual_seed(0)
    grads = torch.randn(4, 16) + 0.5 * torch.randn(16)
    _, w, _ = run("mgda", grads)
    m = solvers.gram(grads)
    a = w.double()
    assert w.min() >= 0 and abs(float(w.sum()) - 1) < 1e-6
    # min-norm optimality: (M a)_i >= a^T M a, with equality on the support
    slack = m @ a - a @ m @ a
    assert slack.min() > -1e-4 * float(m.diagonal().mean())
    assert (slack[a > 1e-3].abs() < 1e-3 * float(m.diagonal().mean())).all()


def test_mgda_bad_normalization():
    with pytest.raises(UserError, match="normalization"):
        build_weighting("mgda", TASKS2, normalization="l1")
    with pytest.raises(UserError, match="unknown option"):
        build_weighting("pcgrad", TASKS2, beta=0.1)


def test_pcgrad_non_conflicting_unchanged():
    grads = G([1, 2, 0], [2, 1, 1])
    d, w, _ = run("pcgrad", grads)
    assert torch.allclose(d, grads.sum(0)) and torch.equal(w, torch.ones(2))


def test_pcgrad_conflicting_projection():
    g1, g2 = torch.tensor([1.0, 1.0, 0.0]), torch.tensor([-2.0, 0.5, 1.0])
    d, _, _ = run("pcgrad", torch.stack([g1, g2]))
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert abs(float(p1 @ g2)) < 1e-6 and abs(float(p2 @ g1)) < 1e-6
    assert torch.allclose(d, p1 + p2, atol=1e-6)


def _surgery_reference(grads, order, adjust):
    """The papers' sequential loop: for each i, the other tasks j in the given order."""
    out = []
    for i in range(grads.shape[0]):
        p = grads[i].clone()
        for j in order[i].tolist():
            p = adjust(i, j, p, grads[j])
        out.append(p)
    return torch.stack(out)


def test_pcgrad_three_tasks_matches_sequential_loop():
    grads = G([1, 0, 0], [-1, 1, 0], [0, -1, 1]) + 0.1
    # a fresh method's first step draws its order from the same generator as this
    order = gw._other_tasks_in_random_order(3, grads.device, build_weighting("pcgrad", TASKS3).generator())
    torch.manual_seed(3)  # the global RNG plays no part
    d, _, _ = run("pcgrad", grads)
    proj = lambda i, j, p, gj: p - torch.clamp(p @ gj, max=0) / (gj @ gj) * gj  # noqa: E731
    assert torch.allclose(d, _surgery_reference(grads, order, proj).sum(0), atol=1e-6)


def test_gradvac_three_tasks_matches_sequential_loop():
    torch.manual_seed(0)
    grads, beta = torch.randn(3, 5), 0.3
    phi_hat = torch.rand(3, 3) - 0.5
    ref_hat = phi_hat.clone()

    def vaccine(i, j, p, gj):
        phi, tgt = float(p @ gj / (p.norm() * gj.norm())), float(ref_hat[i, j])
        if phi < tgt:
            root_phi, root_tgt = (1 - phi**2) ** 0.5, (1 - tgt**2) ** 0.5
            p = p + gj * p.norm() * (tgt * root_phi - phi * root_tgt) / (gj.norm() * root_tgt)
        ref_hat[i, j] = (1 - beta) * tgt + beta * phi
        return p

    method = build_weighting("gradvac", TASKS3, beta=beta)
    method.phi_hat.copy_(phi_hat)
    order = gw._other_tasks_in_random_order(3, grads.device, build_weighting("gradvac", TASKS3).generator())
    d, _ = method(grads, torch.ones(3))
    assert torch.allclose(d, _surgery_reference(grads, order, vaccine).sum(0), atol=1e-5)
    assert torch.allclose(method.phi_hat, ref_hat, atol=1e-6)


def test_gradvac_negative_cosine_to_target_zero():
    g1, g2 = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    d, w, method = run("gradvac", torch.stack([g1, g2]), beta=0.5)
    cos = float(g1 @ g2 / (g1.norm() * g2.norm()))
    # with target 0 each adjusted gradient is orthogonal to the other's original gradient
    p1 = d - (g2 - (g2 @ g1) / (g1 @ g1) * g1)
    assert abs(float(p1 @ g2)) < 1e-6
    assert torch.allclose(d, torch.tensor([0.5, 0.5]) + torch.tensor([0.0, 1.0]), atol=1e-6)
    expected = torch.tensor([[0.0, 0.5 * cos], [0.5 * cos, 0.0]])
    assert torch.allclose(method.phi_hat, expected, atol=1e-6) and torch.equal(w, torch.ones(2))


def test_gradvac_above_target_untouched():
    grads = G([1, 0], [1, 1])
    d, _, method = run("gradvac", grads, beta=0.5)
    assert torch.allclose(d, grads.sum(0))
    cos = 2**-0.5
    assert torch.allclose(method.phi_hat, torch.tensor([[0.0, 0.5 * cos], [0.5 * cos, 0.0]]), atol=1e-6)
    # a positive target above the current cosine lifts each cosine exactly to the target
    method.phi_hat.fill_(0.9)
    method.phi_hat.fill_diagonal_(0.0)
    d, _ = method(grads, torch.ones(2))
    g1, g2 = grads
    # d = p1 + p2 = (1 + c2) g1 + (1 + c1) g2 with p1 = g1 + c1 g2, p2 = g2 + c2 g1
    k = torch.linalg.solve(grads.T, d)
    p1, p2 = g1 + (k[1] - 1) * g2, g2 + (k[0] - 1) * g1
    assert abs(float(p1 @ g2 / (p1.norm() * g2.norm())) - 0.9) < 1e-5
    assert abs(float(p2 @ g1 / (p2.norm() * g1.norm())) - 0.9) < 1e-5
    assert torch.allclose(method.phi_hat[0, 1], torch.tensor(0.5 * 0.9 + 0.5 * cos))


def test_cagrad_zero_c_is_mean():
    torch.manual_seed(0)
    grads = torch.randn(3, 8)
    d, w, _ = run("cagrad", grads, c=0.0)
    assert torch.allclose(d, grads.mean(0), atol=1e-6) and torch.equal(w, torch.ones(3))


def test_cagrad_improves_worst_task():
    grads = G([1.0, 0.1], [-0.8, 0.3])
    g0 = grads.mean(0)
    d, _, _ = run("cagrad", grads, c=0.5, rescale=0)
    assert float((grads @ d).min()) > float((grads @ g0).min()) + 1e-3
    assert float((d - g0).norm()) <= 0.5 * float(g0.norm()) + 1e-5  # stays in the ball around g0


def test_imtl_g_equal_projections():
    torch.manual_seed(0)
    grads = torch.randn(3, 10) * torch.tensor([[1.0], [5.0], [0.2]])
    d, w, _ = run("imtl_g", grads)
    proj = (grads / grads.norm(dim=1, keepdim=True)) @ d
    assert torch.allclose(proj, proj.mean().expand(3), rtol=1e-4)
    assert abs(float(w.sum()) - 1) < 1e-5 and float(proj.mean()) > 0


def test_nash_mtl_bargaining_solution():
    torch.manual_seed(0)
    grads = torch.randn(3, 20) + torch.randn(20)
    _, w, _ = run("nash_mtl", grads)
    m = solvers.gram(grads)
    a = w.double()
    assert (a > 0).all()
    assert torch.allclose(a * (m @ a), torch.ones(3, dtype=torch.float64), atol=1e-4)
    _, w, _ = run("nash_mtl", G([3, 0, 0], [0, 0.5, 0], [0, 0, 2]))
    assert torch.allclose(w, torch.tensor([1 / 3, 2.0, 0.5]), rtol=1e-5)


def test_aligned_mtl_orthogonal_equal_norms():
    torch.manual_seed(0)
    grads = torch.randn(3, 12) + torch.randn(12)
    b = gw.aligned_matrix(solvers.gram(grads)).float()
    aligned = b @ grads
    sigma_min = torch.linalg.svdvals(grads).min()
    assert torch.allclose(aligned @ aligned.T, sigma_min**2 * torch.eye(3), atol=1e-4)
    d, w, _ = run("aligned_mtl", grads)
    assert torch.allclose(d, aligned.mean(0), atol=1e-5) and torch.allclose(w, b.mean(1), atol=1e-6)


def test_aligned_mtl_rank_deficient():
    g1, g2 = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    grads = torch.stack([g1, g2, g1 + g2])
    b = gw.aligned_matrix(solvers.gram(grads)).float()
    aligned = b @ grads
    sigma_min = torch.linalg.svdvals(grads)[1]  # smallest non-zero singular value
    gram = aligned @ aligned.T
    assert torch.isfinite(b).all()
    # on the rank-2 span the aligned gradients act like an orthogonal basis scaled by sigma_min
    eigenvalues = torch.linalg.eigvalsh(gram.double()).float()
    assert torch.allclose(eigenvalues, torch.tensor([0.0, 1.0, 1.0]) * sigma_min**2, atol=1e-4)
    d, w, _ = run("aligned_mtl", torch.zeros(3, 5))
    assert torch.equal(d, torch.zeros(5)) and torch.isfinite(w).all()


def test_upgrad_non_conflicting_is_mean():
    grads = G([1, 0.2, 0], [0.5, 1, 0.1], [0.2, 0.3, 1])
    d, w, _ = run("upgrad", grads)
    assert torch.allclose(d, grads.mean(0), atol=1e-6) and torch.allclose(w, torch.full((3,), 1 / 3))


def test_upgrad_no_conflict_with_any_task():
    torch.manual_seed(0)
    for _ in range(5):
        grads = torch.randn(4, 6)
        d, _, _ = run("upgrad", grads)
        assert float((grads @ d).min()) >= -1e-5


def build_fed(name, tasks, dim=64):
    """A method as the trainer gives it: with a (batch 4) representation of ``dim`` values when it needs one."""
    method = build_weighting(name, tasks)
    if method.needs_representation:  # GradDrop
        method.representation = [torch.randn(4, dim // 4, generator=torch.Generator().manual_seed(0))]
    return method


def per_step(name, grads, losses):
    """A step's input for the method: ``grads`` (T, D) and ``losses`` (T,), or for a method that reads S > 1 batches
    per step (MoDo, SDMGrad) S batches' worth, (S, T, D) and (S, T): here ``grads`` with its columns rolled by 0..S-1,
    unequal gradients of the same norms (zeros stay zeros), the last batch's being ``grads`` rolled by S - 1."""
    s = WEIGHTINGS.get(name).samples
    if s == 1:
        return grads, losses
    return torch.stack([grads.roll(k, dims=1) for k in range(s)]), losses.expand(s, -1)


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_contract(name):
    torch.manual_seed(0)
    tasks = TASKS3
    grads, losses = torch.randn(3, 64), torch.rand(3) + 0.1
    method = build_fed(name, tasks)
    method(*per_step(name, grads, losses))  # advance any running state
    fresh = build_fed(name, tasks)
    fresh.load_state_dict(method.state_dict())
    grads2 = torch.randn(3, 64)
    torch.manual_seed(1)
    d, w = method(*per_step(name, grads2, losses))
    torch.manual_seed(1)
    d2, w2 = fresh(*per_step(name, grads2, losses))
    assert d.shape == (64,) and w.shape == (3,) and d.dtype == torch.float32 and w.dtype == torch.float32
    assert torch.isfinite(d).all() and torch.isfinite(w).all()
    if name not in ("pcgrad", "gradvac", "cagrad", "db_mtl", "moco"):  # heads: w = 1, not the coefficients
        assert torch.equal(method.last_weights, w)
    assert torch.allclose(d, d2) and torch.allclose(w, w2)
    for g in (torch.zeros(3, 64), torch.randn(1, 64)):  # all-zero gradients, a single task
        d, w = build_fed(name, [f"t{i}" for i in range(g.shape[0])])(*per_step(name, g, torch.ones(g.shape[0])))
        assert torch.isfinite(d).all() and torch.isfinite(w).all() and d.shape == (64,)


# GradDrop's update is not a linear combination of the task gradients (each coordinate keeps its own subset of
# tasks): it logs ones, the weight of each task's gradient where its sign survives (its docstring says so)
@pytest.mark.parametrize("name", [n for n in GRADIENT_METHODS if n != "graddrop"])
@pytest.mark.parametrize("t", [2, 4])
def test_logged_weights_are_the_coefficients_of_the_update(name, t):
    """``last_weights`` (what TensorBoard plots) are the coefficients of the update: d = sum_i w_i g_i, checked on
    random gradients over several steps (GradVac's targets and PCGrad's task order change from step to step)."""
    torch.manual_seed(3)
    method = build_weighting(name, [f"t{i}" for i in range(t)])
    for _ in range(3):
        grads = torch.randn(t, 40) * torch.tensor([1.0, 10.0, 0.1, 3.0])[:t, None]
        step = per_step(name, grads, torch.rand(t) + 0.5)
        d, _ = method(*step)
        # DB-MTL and MoCo combine running averages, MoDo and SDMGrad the last batch's gradients
        rows = method.averages if method.from_history else step[0][-1] if method.samples > 1 else grads
        combined = method.last_weights.double() @ rows.double()
        assert torch.allclose(combined, d.double(), atol=1e-5 * float(grads.norm(dim=1).max()), rtol=1e-4)


def test_pcgrad_logged_weights_two_conflicting_gradients():
    """g1 = (1, 0), g2 = (-1, 1) conflict (g1 . g2 = -1): g1' = g1 - (g1.g2)/|g2|^2 g2 = g1 + g2/2 and
    g2' = g2 - (g2.g1)/|g1|^2 g1 = g2 + g1, so d = g1' + g2' = 2 g1 + 1.5 g2 = (0.5, 1.5), whatever the order."""
    for _ in range(3):
        d, w, method = run("pcgrad", G([1, 0], [-1, 1]))
        assert torch.allclose(d, torch.tensor([0.5, 1.5]), atol=1e-6)
        assert torch.allclose(method.last_weights, torch.tensor([2.0, 1.5]), atol=1e-6)
        assert torch.equal(w, torch.ones(2))  # the heads keep their own gradients


def test_mgda_logged_weights_two_gradients_closed_form():
    """Two gradients: the min-norm point of the segment is alpha_1 = clip((g2 - g1) . g2 / |g1 - g2|^2, 0, 1)
    (Sener & Koltun, Alg. 1). g1 = (2, 1), g2 = (-1, 1): (-3, 0) . (-1, 1) / 9 = 1/3, d = (0, 1)."""
    d, w, method = run("mgda", G([2, 1], [-1, 1]))
    assert torch.allclose(method.last_weights, torch.tensor([1 / 3, 2 / 3]), atol=1e-6)
    assert torch.allclose(d, torch.tensor([0.0, 1.0]), atol=1e-6)


def test_cagrad_logged_weights_zero_c_are_the_mean():
    """c = 0: d is the mean gradient, so each coefficient is 1/T."""
    _, _, method = run("cagrad", G([1, 0, 2], [0, 3, -1], [4, 1, 0]), c=0.0)
    assert torch.allclose(method.last_weights, torch.full((3,), 1 / 3), atol=1e-7)


def test_imtl_scales_the_losses_and_sets_the_scale_gradient():
    """IMTL-L: objectives e^{s_t} L_t (gradients e^{s_t} grad L_t), and d/ds_t (e^{s_t} L_t - s_t) = e^{s_t} L_t - 1."""
    method = build_weighting("imtl", TASKS3)
    s = torch.tensor([0.0, 1.0, -2.0])
    with torch.no_grad():
        method.log_scales.copy_(s)
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = [x[0] ** 2, x.sum(), 3 * x[1]]  # values 1, 3, 6
    scaled = method.transform_losses(losses)
    values = torch.tensor([1.0, 3.0, 6.0])
    assert torch.allclose(method.log_scales.grad, torch.exp(s) * values - 1)
    for t in range(3):
        (mine,) = torch.autograd.grad(scaled[t], x, retain_graph=True)
        (plain,) = torch.autograd.grad(losses[t], x, retain_graph=True)
        assert torch.allclose(mine, math.exp(s[t]) * plain)
    assert isinstance(method.log_scales, torch.nn.Parameter) and "log_scales" in method.state_dict()


def test_db_mtl_averages_log_loss_gradients_and_rescales_them_to_the_largest():
    """Eq. 3-5 by hand: h <- beta h + (1 - beta) g from zeros, d = sum_t (max_j |h_j| / |h_t|) h_t, heads w = 1."""
    method = build_weighting("db_mtl", TASKS2, beta=0.5)
    x = torch.tensor([2.0], requires_grad=True)
    (objective,) = method.transform_losses([x[0] ** 2])
    (grad,) = torch.autograd.grad(objective, x)
    assert torch.allclose(objective, torch.log(torch.tensor(4.0 + 1e-8))) and torch.allclose(grad, torch.tensor([1.0]))
    steps = [G([2, 0], [0, 1]), G([0, 2], [0, 3])]
    h = torch.zeros(2, 2, dtype=torch.float64)
    for grads in steps:
        d, w = method(grads, torch.ones(2))
        h = 0.5 * h + 0.5 * grads.double()
        norms = h.norm(dim=1)
        expected = sum(float(norms.max() / norms[t]) * h[t] for t in range(2))
        assert torch.allclose(d.double(), expected, atol=1e-6) and torch.equal(w, torch.ones(2))
    # the second step by hand: h = ((0.5, 1), (0, 1.75)), |h| = (sqrt(1.25), 1.75): d = (1.75 / sqrt(1.25)) h_1 + h_2
    assert torch.allclose(d, torch.tensor([0.5, 1.0]) * (1.75 / 1.25**0.5) + torch.tensor([0.0, 1.75]), atol=1e-6)
    fresh = build_weighting("db_mtl", TASKS2, beta=0.5)
    fresh.load_state_dict(method.state_dict())  # the averages' size is known only after the first step
    assert torch.equal(fresh.averages, method.averages) and fresh(steps[0], torch.ones(2))[0].shape == (2,)


def test_db_mtl_sigma_decays_beta_with_the_step():
    method = build_weighting("db_mtl", TASKS2, beta=0.8, beta_sigma=1.0)
    method(G([1, 0], [0, 1]), torch.ones(2))  # step 1: beta 0.8
    method(G([0, 1], [1, 0]), torch.ones(2))  # step 2: beta 0.4
    h1 = 0.2 * torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert torch.allclose(method.averages, 0.4 * h1 + 0.6 * torch.tensor([[0.0, 1.0], [1.0, 0.0]]))


def _simplex_by_brute_force(v):
    """The closest point of the simplex to v: on each support S, x_S = v_S - (sum v_S - 1) / |S|; best feasible."""
    import itertools

    v = v.double()
    best, best_x = None, None
    for k in range(1, len(v) + 1):
        for support in itertools.combinations(range(len(v)), k):
            x = torch.zeros_like(v)
            idx = list(support)
            x[idx] = v[idx] - (v[idx].sum() - 1) / k
            if (x >= -1e-12).all() and (best is None or float((x - v).norm()) < best):
                best, best_x = float((x - v).norm()), x
    return best_x


def test_simplex_projection_matches_brute_force():
    torch.manual_seed(0)
    for t in (1, 2, 3, 5, 7):
        for scale in (0.1, 1.0, 10.0):
            v = torch.randn(t, dtype=torch.float64) * scale
            assert torch.allclose(gw._project_simplex(v), _simplex_by_brute_force(v), atol=1e-12), (t, scale)


@pytest.mark.parametrize("simplex, grad_scale", [("projection", "none"), ("softmax", "loss")])
def test_moco_tracks_gradients_and_weights_step_by_step(simplex, grad_scale):
    """Alg. 1 by hand in float64: y <- y - beta_k (y - g), lambda <- Pi(lambda - gamma_k (Y Y^T + rho I) lambda)."""
    options = dict(
        beta=0.5, beta_sigma=0.5, gamma=0.3, gamma_sigma=0.5, rho=0.1, simplex=simplex, grad_scale=grad_scale
    )
    method = build_weighting("moco", TASKS3, **options)
    torch.manual_seed(1)
    y, lam = torch.zeros(3, 6, dtype=torch.float64), torch.full((3,), 1 / 3, dtype=torch.float64)
    for k in range(1, 5):
        grads, losses = torch.randn(3, 6) * torch.tensor([[1.0], [5.0], [0.2]]), torch.rand(3) + 0.5
        d, w = method(grads, losses)
        g = grads.double()
        if grad_scale == "loss":
            g = g / (g.norm(dim=1, keepdim=True) + 1e-8) * losses.double().unsqueeze(1)
        y = y - 0.5 / k**0.5 * (y - g)
        moved = lam - 0.3 / k**0.5 * ((y @ y.T + 0.1 * torch.eye(3, dtype=torch.float64)) @ lam)
        lam = _simplex_by_brute_force(moved) if simplex == "projection" else torch.softmax(moved, 0)
        assert torch.allclose(method.last_weights.double(), lam, atol=1e-6), k
        assert torch.allclose(d.double(), lam @ y, atol=1e-5) and torch.equal(w, torch.ones(3))


def test_moco_bad_options():
    for options, message in (({"simplex": "nope"}, "projection or softmax"), ({"grad_scale": "l2"}, "none or loss")):
        with pytest.raises(UserError, match=message):
            build_weighting("moco", TASKS2, **options)
