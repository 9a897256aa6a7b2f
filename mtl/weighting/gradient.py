"""Gradient-level weighting methods: each turns the (T, D) task gradients into one shared update ``d``.

Every method returns ``(d, w)``: ``d`` (D,) float32 replaces the shared gradient, ``w`` (T,) float32 weighs
the task losses for the task-specific parts (heads). Methods that combine gradients linearly
(``d = G^T alpha``) return ``w = alpha``; those that edit the gradients themselves (PCGrad, GradVac, CAGrad,
GradDrop) or combine running averages of them (DB-MTL, MoCo: ``from_history``) return ones, as in their papers' or
authors' multitask code. Every method's update but GradDrop's is a linear combination of the task gradients (of their
running averages for DB-MTL and MoCo; of the last batch's for MoDo and SDMGrad, which read three batches per step),
and ``last_weights`` (what is logged) holds its coefficients, ``d = sum_i last_weights_i g_i``: for PCGrad and
GradVac they are tracked through the projections, for CAGrad they follow from its closed form. GradDrop keeps a
different set of tasks at each coordinate and logs ones.
The methods built on the Gram matrix ``G G^T`` (MGDA, CAGrad, IMTL-G, IMTL, Nash-MTL, FairGrad, Aligned-MTL, UPGrad,
DualProj, ConFIG) form it on the gradients' device in float64, read it to the host once per step and solve their
T x T problem there exactly (see solvers.py); MoDo and SDMGrad form ``G_1 G_2^T`` of two batches the same way and
take their projected steps on the device. No direction depends on the gradients' global scale, except FairGrad's
for ``alpha != 1`` and MoCo's and MoDo's (their step on the weights is proportional to ``G G^T``), as in their
papers. ``task_weights`` are used as preference weights by ``aligned_mtl``, ``upgrad`` and ``dualproj`` and ignored
by the other methods.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch
from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.weighting import solvers
from mtl.weighting.base import WEIGHTINGS, GradientWeighting


def _combine(grads: Tensor, alpha: Tensor) -> Tuple[Tensor, Tensor]:
    """``(G^T alpha, alpha)`` in float32 on the gradients' device (alpha may come from the host)."""
    alpha = alpha.to(grads.device, torch.float32, non_blocking=True)
    return alpha @ grads, alpha


def _unit_scale(grads: Tensor) -> Tuple[Tensor, Tensor]:
    """``(G / s, s)`` with s the largest gradient norm (1 when all are zero): surgery methods work at unit scale,
    so that no floor on a norm depends on how large the gradients are."""
    s = grads.norm(dim=1).amax()
    s = torch.where(s > 0, s, torch.ones_like(s))
    return grads / s, s


def _other_tasks_in_random_order(t: int, device: torch.device, generator: torch.Generator) -> Tensor:
    """(T, T-1) long: row i lists the tasks j != i in an independent random order (drawn on the CPU)."""
    keys = torch.rand(t, t, generator=generator) + 2.0 * torch.eye(t)  # self sorts last
    return keys.argsort(dim=1)[:, : t - 1].to(device, non_blocking=True)


def _pick(order_col: Tensor, values: Tensor, t: int) -> Tensor:
    """(T, T) matrix with ``values[i]`` at column ``order_col[i]`` of row i, zeros elsewhere."""
    out = torch.zeros(t, t, dtype=values.dtype, device=values.device)
    return out.scatter(1, order_col.unsqueeze(1), values.unsqueeze(1))


@WEIGHTINGS.register("mgda")
class MGDA(GradientWeighting):
    """MGDA (Sener & Koltun, NeurIPS 2018, eq. 3 / Alg. 2): ``alpha = argmin_{alpha in simplex} |G^T alpha|^2``, the
    min-norm point of the convex hull of the gradients, solved exactly (``solvers.min_norm_simplex``).

    ``normalization`` rescales each gradient before the min-norm problem: ``none``, ``l2`` (by its norm),
    ``loss`` (by the task loss) or ``loss+`` (loss times norm). As in the authors' code, ``alpha`` is then
    applied to the unnormalised gradients/losses: ``d = G^T alpha``, ``w = alpha``.
    """

    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, normalization: str = "none"
    ) -> None:
        super().__init__(tasks, task_weights)
        if normalization not in self.NORMALIZATIONS:
            raise UserError(
                f"weighting.options.normalization for mgda must be one of "
                f"{', '.join(self.NORMALIZATIONS)}, got {normalization!r}"
            )
        self.normalization = normalization

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        m = solvers.gram(grads).cpu()
        norms = m.diagonal().clamp_min(0.0).sqrt()
        loss = losses.detach().to("cpu", torch.float64)
        scale = {"none": torch.ones_like(norms), "l2": norms, "loss": loss, "loss+": loss * norms}[self.normalization]
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # a zero gradient or loss stays as it is
        alpha = solvers.min_norm_simplex(m / scale.unsqueeze(0) / scale.unsqueeze(1))
        d, w = _combine(grads, alpha)
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("pcgrad")
class PCGrad(GradientWeighting):
    """PCGrad (Yu et al., NeurIPS 2020): "gradient surgery".

    For each task i and the other tasks j in random order: if ``g_i' . g_j < 0``, remove from the running
    ``g_i'`` its component along the original ``g_j``. ``d = sum_i g_i'``, ``w = 1``. All tasks i are
    processed together (step k handles the k-th partner of every i), branch-free. Each ``g_i'`` stays a linear
    combination ``sum_j C_ij g_j`` (C starts as the identity; a projection subtracts its coefficient from
    ``C_ij``), so ``last_weights = 1^T C``: ``d = sum_j last_weights_j g_j``.
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        g, scale = _unit_scale(grads.float())
        t = g.shape[0]
        sq = (g * g).sum(1)
        order = _other_tasks_in_random_order(t, g.device, self.generator())
        p = g.clone()
        c = torch.eye(t, device=g.device)  # p = C g
        for k in range(t - 1):
            j = order[:, k]
            dot = (p @ g.T).gather(1, j.unsqueeze(1)).squeeze(1)
            coef = torch.where(sq[j] > 0, dot.clamp(max=0.0) / torch.where(sq[j] > 0, sq[j], 1.0), 0.0)
            step = _pick(j, coef, t)
            p.addmm_(step, g, alpha=-1.0)
            c.sub_(step)
        self.last_weights.copy_(c.sum(0))  # the unit scale cancels: d = s (1^T C) (G / s)
        return p.sum(0) * scale, torch.ones(t, device=g.device)


@WEIGHTINGS.register("gradvac")
class GradVac(GradientWeighting):
    """Gradient Vaccine (Wang et al., ICLR 2021), on the whole flattened gradient.

    Targets ``phi_hat[i, j]`` (buffer, init 0) track the cosine similarity of task pairs by an EMA with
    rate ``beta``. For each i and the other tasks j in random order, with ``phi = cos(g_i', g_j)``: if
    ``phi < phi_hat``, ``g_i' += g_j * |g_i'| (phi_hat sqrt(1-phi^2) - phi sqrt(1-phi_hat^2)) /
    (|g_j| sqrt(1-phi_hat^2))`` which sets the cosine to exactly ``phi_hat``; then
    ``phi_hat <- (1 - beta) phi_hat + beta phi``. ``d = sum_i g_i'``, ``w = 1``. As in PCGrad, the coefficients
    of ``d`` in the task gradients are tracked through the updates: ``d = sum_j last_weights_j g_j``.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, beta: float = 0.5) -> None:
        super().__init__(tasks, task_weights)
        if not 0.0 < beta <= 1.0:
            raise UserError(f"weighting.options.beta must be in (0, 1] for gradvac, got {beta}")
        self.beta = float(beta)
        self.register_buffer("phi_hat", torch.zeros(self.num_tasks, self.num_tasks))

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        g, scale = _unit_scale(grads.float())
        t = g.shape[0]
        gnorm = g.norm(dim=1)
        order = _other_tasks_in_random_order(t, g.device, self.generator())
        p = g.clone()
        c = torch.eye(t, device=g.device)  # p = C g
        for k in range(t - 1):
            j = order[:, k]
            col = j.unsqueeze(1)
            pnorm = p.norm(dim=1)
            gj_norm = gnorm[j]
            dot = (p @ g.T).gather(1, col).squeeze(1)
            both = (gj_norm > 0) & (pnorm > 0)
            phi = torch.where(both, dot / torch.where(both, pnorm * gj_norm, 1.0), 0.0).clamp(-1.0, 1.0)
            target = self.phi_hat.gather(1, col).squeeze(1)
            root_phi = (1.0 - phi * phi).clamp_min(0.0).sqrt()
            root_target = (1.0 - target * target).clamp_min(0.0).sqrt()
            lift = both & (phi < target) & (root_target > 0)
            coef = pnorm * (target * root_phi - phi * root_target) / torch.where(lift, gj_norm * root_target, 1.0)
            step = _pick(j, torch.where(lift, coef, 0.0), t)
            p.addmm_(step, g)
            c.add_(step)
            updated = torch.where(both, (1.0 - self.beta) * target + self.beta * phi, target)
            self.phi_hat.scatter_(1, col, updated.unsqueeze(1))
        self.last_weights.copy_(c.sum(0))  # the unit scale cancels: d = s (1^T C) (G / s)
        return p.sum(0) * scale, torch.ones(t, device=g.device)


@WEIGHTINGS.register("cagrad")
class CAGrad(GradientWeighting):
    """Conflict-Averse Gradient descent (Liu et al., NeurIPS 2021).

    ``w* = argmin_{w in simplex} g_w . g0 + sqrt(phi) |g_w|`` with ``g0`` the mean gradient,
    ``phi = c^2 |g0|^2`` and ``g_w = G^T w`` (the dual of ``max_d min_i g_i . d`` over ``|d - g0| <= sqrt(phi)``),
    solved exactly (``solvers.cagrad_weights``); ``d = g0 + sqrt(phi) / |g_w| g_w``, divided by ``1 + c^2``
    (``rescale=1``, the paper's), ``1 + c`` (``rescale=2``) or not at all (``rescale=0``). ``c = 0`` gives the
    mean gradient, and so does ``g_w = 0`` (possible for ``c >= 1``). Heads get ``w = 1`` (each head's own
    gradient, as in the official code). ``d = G^T (1 / T + lambda w*) / r`` (``lambda = sqrt(phi) / |g_w|``,
    r the rescale divisor): ``last_weights`` holds these coefficients.
    """

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, c: float = 0.4, rescale: int = 1
    ) -> None:
        super().__init__(tasks, task_weights)
        if not c >= 0 or c == float("inf"):
            raise UserError(f"weighting.options.c must be a number >= 0 for cagrad, got {c}")
        if rescale not in (0, 1, 2):
            raise UserError(f"weighting.options.rescale must be 0, 1 or 2 for cagrad, got {rescale!r}")
        self.c, self.rescale = float(c), int(rescale)

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        g = grads.float()
        t = g.shape[0]
        m = solvers.host(solvers.gram(g))
        ww = solvers.cagrad_weights(m, self.c)
        gw_sq = float(ww @ m @ ww)
        # |g0| / |g_w| is scale-free, so the host's normalised M gives it; |g0|^2 = 1^T M 1 / T^2
        lam = self.c * math.sqrt(max(float(m.mean()), 0.0) / gw_sq) if gw_sq > solvers.ORIGIN**2 else 0.0
        divisor = {0: 1.0, 1: 1.0 + self.c**2, 2: 1.0 + self.c}[self.rescale]
        d, coefficients = _combine(g, (ww * lam + 1.0 / t) / divisor)
        self.last_weights.copy_(coefficients)
        return d, torch.ones(t, device=g.device)


@WEIGHTINGS.register("imtl_g")
class IMTLG(GradientWeighting):
    """IMTL-G (Liu et al., ICLR 2021): ``d = G^T alpha`` with equal projections ``d . u_i`` on every unit
    gradient ``u_i`` and ``sum(alpha) = 1``.

    Closed form: ``N M alpha = c 1`` with ``N = diag(1/|g_i|)`` gives ``alpha ∝ M^{-1} n`` (``n``: gradient
    norms), equivalent to the paper's (T-1)-system; solved on the correlation matrix ``N M N`` (LAPACK, float64).
    Linearly dependent gradients have no exact answer (the system is singular): least squares then gives the
    closest one. A zero gradient gets weight 0.
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        t = grads.shape[0]
        c, n, valid = solvers.correlation(solvers.host(solvers.gram(grads)))
        ones = torch.ones(t, 1, dtype=c.dtype)
        y, info = torch.linalg.solve_ex(c, ones)
        if int(info) != 0 or not bool(torch.isfinite(y).all()):
            y = torch.linalg.lstsq(c, ones, driver="gelsd").solution
        x = torch.where(valid, y.squeeze(1) / torch.where(valid, n, 1.0), 0.0)  # = M^-1 n on valid tasks
        total = float(x.sum())
        alpha = x / total if total != 0 and math.isfinite(total) else torch.full((t,), 1.0 / t, dtype=c.dtype)
        d, w = _combine(grads, alpha)
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("imtl")
class IMTL(IMTLG):
    """IMTL, the full method (Liu et al., ICLR 2021, Alg. 1): IMTL-L scales each loss, IMTL-G balances the gradients
    of the scaled losses.

    IMTL-L (Sec. 3.1, Eq. 2): task t's objective is ``e^{s_t} L_t - s_t`` with a learnable ``s_t`` (init 0, trained by
    the run's optimizer, in the group ``weighting``) that descends its gradient ``e^{s_t} L_t - 1``, which pulls
    every scaled loss ``e^{s_t} L_t`` towards 1. IMTL-G (Sec. 3.2) then combines the gradients of ``e^{s_t} L_t`` as
    ``imtl_g`` does; the heads train on ``sum_t w_t e^{s_t} L_t``. ``last_weights`` are the coefficients on the
    scaled losses' gradients.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None) -> None:
        super().__init__(tasks, task_weights)
        self.log_scales = nn.Parameter(torch.zeros(self.num_tasks))

    def transform_losses(self, losses: List[Tensor]) -> List[Tensor]:
        scales = torch.exp(self.log_scales.detach())
        values = torch.stack([loss.detach() for loss in losses]).to(scales)
        self.log_scales.grad = scales * values - 1  # d/ds (e^s L - s); the constant -s moves no model weight
        return [scale.to(loss.dtype) * loss for scale, loss in zip(scales, losses)]


@WEIGHTINGS.register("nash_mtl")
class NashMTL(GradientWeighting):
    """Nash-MTL (Navon et al., ICML 2022): ``alpha > 0`` with ``alpha_i (G G^T alpha)_i = 1``.

    Solved to rounding (damped Newton, ``solvers.nash_newton``) as the minimiser of
    ``alpha^T M alpha / 2 - sum(log alpha)`` instead of the official sequential cvxpy program; then
    ``|d| = sqrt(T)`` whatever the gradient scale. The official code divides ``G G^T`` by its norm before
    solving, but its constraint multiplies the norm back in, so its weights equal these. ``normalize_gram=True``
    solves on ``M / |M|_F`` without that compensation (alpha and d then scale with ``|M|_F^{1/2}``, i.e. with
    the gradients): a variant, not the paper's method. Linearly dependent gradients can make the equation
    unsolvable (``g_1 = -g_2``); a tiny ridge keeps the answer finite then.
    """

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, normalize_gram: bool = False
    ) -> None:
        super().__init__(tasks, task_weights)
        self.normalize_gram = bool(normalize_gram)

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        m = solvers.gram(grads).cpu()
        if self.normalize_gram:
            m = m / max(float(torch.linalg.matrix_norm(m)), solvers.TINY)
        d, w = _combine(grads, solvers.nash_newton(m))
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("aligned_mtl")
class AlignedMTL(GradientWeighting):
    """Aligned-MTL (Senushkin et al., CVPR 2023).

    With ``M = G G^T = V diag(lambda) V^T``, the aligned gradients ``B G`` with ``B = sigma_min V
    diag(lambda^{-1/2}) V^T`` are orthogonal with equal norms ``sigma_min`` (smallest non-zero singular
    value of G). ``d = (B G)^T p = G^T alpha`` with ``alpha = B p`` and pre-weights ``p = task_weights / T``;
    ``w = alpha``. Eigenvalues below ``lambda_max * T * 1e-12`` count as zero (``solvers.RANK_TOL``): that is
    the float32 gradients' own rounding, seen through a float64 Gram matrix. (The official code's
    ``T * eps_float32`` suits its float32 Gram matrix, but would call norm spreads beyond about 3,000 rank-deficient.)
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        b = aligned_matrix(solvers.gram(grads))
        alpha = b @ (self.task_weights.double().cpu() / self.num_tasks)
        d, w = _combine(grads, alpha)
        self.last_weights.copy_(w)
        return d, w


def aligned_matrix(m: Tensor) -> Tensor:
    """Aligned-MTL's ``B = sigma_min M^{+1/2}`` (pseudo-inverse square root on the non-zero eigenvalues), CPU
    float64."""
    t = m.shape[0]
    lam, vec, keep = solvers.nonzero_eigen(solvers.host(m))
    if not bool(keep.any()):
        return torch.zeros(t, t, dtype=torch.float64)
    lam_safe = torch.where(keep, lam, 1.0)
    sigma_min = float(lam[keep].min()) ** 0.5
    inv_sqrt = torch.where(keep, lam_safe.rsqrt(), 0.0)
    return sigma_min * (vec * inv_sqrt) @ vec.T


@WEIGHTINGS.register("upgrad")
class UPGrad(GradientWeighting):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", TorchJD).

    Each ``g_i`` is projected onto the dual cone ``{x : G x >= 0}``; the projection is ``G^T v_i`` with
    ``v_i = argmin_{v >= e_i} v^T M v``, solved exactly (``solvers.dual_cone_weights``). ``alpha = sum_i p_i v_i``
    with ``p = task_weights / T`` (the mean of the projections by default); ``d = G^T alpha``, ``w = alpha``.
    Every projection lies in the cone, so ``g_j . d >= 0`` for every task j.
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        m = solvers.gram(grads)
        v = solvers.dual_cone_weights(m, torch.eye(self.num_tasks, dtype=torch.float64))  # column i = v_i
        alpha = v @ (self.task_weights.double().cpu() / self.num_tasks)
        d, w = _combine(grads, alpha)
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("dualproj")
class DualProj(GradientWeighting):
    """DualProj (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024; TorchJD's aggregator): the
    weighted mean ``G^T p`` (``p = task_weights / T``) projected onto the dual cone ``{x : G x >= 0}``.

    The projection is ``G^T v`` with ``v = argmin_{v >= p} v^T M v`` (``solvers.dual_cone_weights``, exact), so
    ``g_j . d >= 0`` for every task j; a mean that conflicts with no task is returned unchanged.
    ``d = G^T v``, ``w = v``.
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        p = (self.task_weights.double().cpu() / self.num_tasks).unsqueeze(1)
        d, w = _combine(grads, solvers.dual_cone_weights(solvers.gram(grads), p)[:, 0])
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("config")
class ConFIG(GradientWeighting):
    """ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
    ICLR 2025, Eq. 2): ``d = (sum_i g_i . e) e`` with ``e`` the unit vector of ``U^+ 1``, ``U`` the matrix of unit
    gradients ``u_i = g_i / |g_i|`` (rows): the direction with the same cosine to every task gradient, scaled by
    the sum of the gradients' projections on it.

    Solved on the correlation matrix ``C = U U^T`` (float64): ``U^+ 1 = U^T c`` with ``c = C^+ 1`` (the
    pseudo-inverse drops eigenvalues below ``lambda_max * T * 1e-12``, ``solvers.RANK_TOL``, as for Aligned-MTL),
    so ``d = G^T alpha`` with ``alpha_i = s c_i / |g_i|`` and ``s = (sum_j (M a)_j) / (c^T C c)``, ``a = c / n``.
    A zero gradient gets weight 0; unit gradients that cancel (``|U^+ 1|^2 <= T * 1e-12``) give ``d = 0``.
    ``w = alpha``.
    """

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        t = grads.shape[0]
        m = solvers.host(solvers.gram(grads))
        corr, n, valid = solvers.correlation(m)
        corr = torch.where(valid.unsqueeze(0) & valid.unsqueeze(1), corr, 0.0)  # zero gradients take no part
        lam, vec, keep = solvers.nonzero_eigen(corr)
        inv = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        c = (vec * inv) @ (vec.T @ torch.ones(t, dtype=m.dtype))
        a = torch.where(valid, c / torch.where(valid, n, 1.0), 0.0)
        length2 = float(c @ corr @ c)  # |U^+ 1|^2
        # |U^+ 1| = 0 when the unit gradients cancel (g_1 = -g_2): then no direction has a positive cosine with
        # every task, and d = 0; below T * 1e-12 it is the float32 gradients' rounding
        cancel = length2 <= t * solvers.RANK_TOL
        alpha = torch.zeros(t, dtype=m.dtype) if cancel else a * (float((m @ a).sum()) / length2)
        d, w = _combine(grads, alpha)
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("fairgrad")
class FairGrad(GradientWeighting):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, Eq. 8): ``d = G^T alpha``
    with ``alpha > 0`` solving ``G G^T alpha = alpha^(-1/a)``, the update that maximises the alpha-fair utility of the
    tasks' improvements ``g_i . d`` (``a`` = the option ``alpha``; 1 is proportional fairness, Nash-MTL's equation;
    larger values favour the worst-off task). Solved to rounding (``solvers.fair_newton``) instead of the paper's
    least-squares iterations. Unlike ``a = 1``, other values make ``|d|`` scale with the gradients. ``w = alpha``.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, alpha: float = 1.0) -> None:
        super().__init__(tasks, task_weights)
        if not alpha > 0:
            raise UserError(f"weighting.options.alpha must be > 0 for fairgrad, got {alpha}")
        self.alpha = float(alpha)

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        d, w = _combine(grads, solvers.fair_newton(solvers.gram(grads), self.alpha))
        self.last_weights.copy_(w)
        return d, w


class _Tracked(GradientWeighting):
    """A method whose update combines running averages ``averages`` (T x D, sized by the first gradients seen,
    checkpointed for exact resume) of the task gradients; ``_steps`` counts its training steps."""

    from_history = True
    grad_on_modes = ("params",)
    grad_on_reason = (
        "averages each task's gradients over steps, which needs gradients with respect to the shared parameters "
        "(the representation's belong to each batch's own images)"
    )
    counters = {**GradientWeighting.counters, "steps": "_steps"}

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None) -> None:
        super().__init__(tasks, task_weights)
        self.register_buffer("averages", torch.zeros(0))
        self._steps = 0

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        saved = state_dict.get(prefix + "averages")
        if saved is not None and saved.shape != self.averages.shape:  # the size is known once gradients were seen
            self.averages = torch.zeros_like(saved, device=self.averages.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _track(self, grads: Tensor, rate: float) -> Tensor:
        """``averages <- averages - rate * (averages - grads)`` (zeros before the first step, or when the shared
        parameters change, e.g. with train.unfreeze); returns the averages."""
        if self.averages.shape != grads.shape:
            self.averages = torch.zeros_like(grads)
        return self.averages.sub_((self.averages - grads) * rate)


@WEIGHTINGS.register("db_mtl")
class DBMTL(_Tracked):
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", 2023, Sec. 3): loss-scale balancing, then
    gradient-magnitude balancing.

    Each task's objective is ``log(L_t + eps)`` (Eq. 3), whose gradients ``g_t`` are averaged over steps,
    ``h_t <- beta_k h_t + (1 - beta_k) g_t`` with ``beta_k = beta / k^beta_sigma`` at step k (Eq. 4; from zeros,
    without bias correction, as in the authors' code in LibMTL), and rescaled to the largest average's norm (Eq. 5):
    ``d = sum_t (max_j |h_j| / |h_t|) h_t``. The heads train on ``sum_t log(L_t + eps)`` (``w = 1``). ``last_weights``
    are the coefficients on the averages ``h_t``. The averages (T x D floats) are checkpointed for exact resume.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, task_weights)
        if not 0 <= beta < 1:
            raise UserError(f"weighting.options.beta must be in [0, 1) for db_mtl, got {beta}")
        self.beta, self.beta_sigma, self.eps = float(beta), float(beta_sigma), float(eps)

    def transform_losses(self, losses: List[Tensor]) -> List[Tensor]:
        return [torch.log(loss + self.eps) for loss in losses]

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        self._steps += 1
        averages = self._track(grads.float(), 1 - self.beta / self._steps**self.beta_sigma)
        norms = averages.norm(dim=1)
        alpha = norms.amax() / (norms + 1e-8)
        self.last_weights.copy_(alpha)
        return alpha @ averages, torch.ones_like(alpha)


def _project_simplex(v: Tensor) -> Tensor:
    """Euclidean projection of ``v`` onto the probability simplex (Duchi et al., ICML 2008, Fig. 1), on its device."""
    u = torch.sort(v, descending=True).values
    cumulative = u.cumsum(0) - 1
    k = torch.arange(1, v.numel() + 1, device=v.device, dtype=v.dtype)
    rho = (u - cumulative / k > 0).sum()  # the number of positive entries
    tau = cumulative.gather(0, (rho - 1).clamp_min(0).unsqueeze(0)) / rho.clamp_min(1).to(v.dtype)
    return (v - tau).clamp_min(0)


@WEIGHTINGS.register("moco")
class MoCo(_Tracked):
    """MoCo (Fernando et al., "Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach",
    ICLR 2023, Alg. 1): tracked gradients ``y_t <- y_t - beta_k (y_t - g_t)`` and weights
    ``lambda <- Pi(lambda - gamma_k (Y Y^T + rho I) lambda)``, ``d = Y^T lambda``, with ``beta_k = beta / k^beta_sigma``
    and ``gamma_k = gamma / k^gamma_sigma`` at step k (from ``y = 0``, ``lambda = 1/T``).

    ``simplex: projection`` (the paper's Euclidean projection ``Pi`` onto the simplex) or ``softmax`` (the authors'
    code, as in LibMTL); ``grad_scale: none`` (the paper) or ``loss`` (the authors' code: each ``g_t`` rescaled to
    norm ``L_t`` before tracking). Defaults otherwise are LibMTL's. The heads train on ``sum_t L_t`` (``w = 1``), as
    in the authors' code. ``last_weights`` = ``lambda``, the coefficients on the tracked ``y_t``. The tracked gradients
    (T x D floats) are checkpointed for exact resume.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        simplex: str = "projection",
        grad_scale: str = "none",
    ) -> None:
        super().__init__(tasks, task_weights)
        if simplex not in ("projection", "softmax"):
            raise UserError(f"weighting.options.simplex for moco must be projection or softmax, got {simplex!r}")
        if grad_scale not in ("none", "loss"):
            raise UserError(f"weighting.options.grad_scale for moco must be none or loss, got {grad_scale!r}")
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.simplex, self.grad_scale = simplex, grad_scale
        self.register_buffer("lam", torch.full((self.num_tasks,), 1.0 / self.num_tasks))

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        if self.grad_scale == "loss":
            grads = grads / (grads.norm(dim=1, keepdim=True) + 1e-8) * losses.to(grads).unsqueeze(1)
        self._steps += 1
        y = self._track(grads, self.beta / self._steps**self.beta_sigma)
        step = (y @ y.T + self.rho * torch.eye(self.num_tasks, device=y.device)) @ self.lam.to(y)
        moved = self.lam.to(y) - self.gamma / self._steps**self.gamma_sigma * step
        lam = _project_simplex(moved) if self.simplex == "projection" else torch.softmax(moved, dim=0)
        self.lam.copy_(lam)
        self.last_weights.copy_(lam)
        return lam @ y, torch.ones_like(lam)


@WEIGHTINGS.register("excess_mtl")
class ExcessMTL(GradientWeighting):
    """ExcessMTL (He et al., "Robust Multi-Task Learning with Excess Risks", ICML 2024): task weights that grow with
    each task's excess risk (its distance to convergence), so that a noisy task's large Bayes error does not draw them.

    Excess risks by the second-order Taylor estimate ``E_t = 1/2 g_t^T H_t^{-1} g_t`` (Eq. 6), with the Hessian
    approximated by AdaGrad's diagonal ``H_t = diag(sqrt(S_t + 1e-7))``, ``S_t`` the sum of the squared task
    gradients over the steps so far, this one included (Eq. 7; 1e-7 as in the authors' code). Scaled by the initial
    excess risks ``E_t^0`` (their mean over the first ``warmup_steps`` steps, during which the weights stay uniform;
    1, the authors' code: the first step), the weights take an exponentiated-gradient step
    ``alpha_t <- alpha_t exp(robust_step_size E_t / E_t^0)``, normalised to sum to 1 (Eq. 9), from ``alpha = 1/T``;
    ``d = G^T alpha``, ``w = alpha``. The 1/2 cancels in ``E_t / E_t^0``. ``robust_step_size`` 0.01 is the authors'
    code's; their code keeps weights that sum to T (the same direction, T times longer). A task whose initial excess
    risk is 0 (a zero gradient) gets ``E_t / E_t^0 = 0``. ``S`` (T x D floats), the weights and the initial risks are
    checkpointed for exact resume; ``S`` and the initial risks start over when the shared parameters change
    (train.unfreeze). Needs grad_on=params: ``S`` sums squared gradients coordinate by coordinate over steps.
    """

    EPS = 1e-7
    grad_on_modes = ("params",)
    grad_on_reason = (
        "sums each task's squared gradients over steps, which needs gradients with respect to the shared parameters "
        "(the representation's belong to each batch's own images)"
    )
    counters = {**GradientWeighting.counters, "steps": "_steps"}

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        robust_step_size: float = 0.01,
        warmup_steps: int = 1,
    ) -> None:
        super().__init__(tasks, task_weights)
        if not robust_step_size > 0:
            raise UserError(f"weighting.options.robust_step_size must be > 0 for excess_mtl, got {robust_step_size}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise UserError(
                f"weighting.options.warmup_steps must be an integer >= 1 for excess_mtl, got {warmup_steps!r}"
            )
        self.robust_step_size, self.warmup_steps = float(robust_step_size), warmup_steps
        self.register_buffer("squares", torch.zeros(0))  # S, sized by the first gradients seen
        self.register_buffer("initial", torch.zeros(self.num_tasks))  # E^0 (a running mean during the warmup)
        self.register_buffer("alpha", torch.full((self.num_tasks,), 1.0 / self.num_tasks))
        self._steps = 0  # steps since S started

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        saved = state_dict.get(prefix + "squares")
        if saved is not None and saved.shape != self.squares.shape:  # the size is known once gradients were seen
            self.squares = torch.zeros_like(saved, device=self.squares.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        if self.squares.shape != grads.shape:
            self.squares = torch.zeros_like(grads)
            self._steps = 0
        self._steps += 1
        squared = grads * grads
        self.squares.add_(squared)
        risks = (squared / (self.squares + self.EPS).sqrt()).sum(1)
        if self._steps <= self.warmup_steps:
            if self._steps == 1:
                self.initial.zero_()
            self.initial.add_(risks / self.warmup_steps)
        else:
            scaled = torch.where(self.initial > 0, risks / self.initial, 0.0)
            # alpha exp(eta E / E^0), normalised, computed as a softmax of the logarithms (no overflow)
            self.alpha.copy_(torch.softmax(self.alpha.log() + self.robust_step_size * scaled, dim=0))
        self.last_weights.copy_(self.alpha)
        return self.alpha @ grads, self.alpha.clone()


@WEIGHTINGS.register("graddrop")
class GradDrop(GradientWeighting):
    """GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout",
    NeurIPS 2020, Eq. 1-2 and Alg. 1), on the gradients with respect to the shared representation (activations).

    For each feature tensor ``A`` (batch first) and task i, the batch-separated gradient ``G_i = sum_batch sign(A) *
    dL_i/dA`` (one value per feature position); the Gradient Positive Sign Purity ``P = 1/2 (1 + sum_i G_i /
    sum_i |G_i|)`` (Eq. 1; 1/2 where every ``G_i`` is 0); with ``U ~ Uniform(0, 1)`` drawn per position, the masks
    ``M_i = [P > U] [G_i > 0] + [P < U] [G_i < 0]`` (Eq. 2, ``f`` the identity), so that at each position only the
    gradients of one sign survive, positive ones with probability P. ``d = sum_i (leak + (1 - leak) M_i) * dL_i/dA``,
    the masks repeated over the batch (``leak`` 0, LibMTL's default; the paper's ``l_i``, one value for all tasks).
    ``U`` is drawn on the CPU from :meth:`generator`. The heads get their own task's gradient (``w = 1``). ``d`` is
    not a linear combination of the task gradients (each coordinate keeps its own subset of tasks), so
    ``last_weights`` logs ones: every task's gradient enters unscaled where its sign survives. Needs
    grad_on=representation: the trainer gives the features as ``representation``.
    """

    grad_on_modes = ("representation",)
    grad_on_reason = "drops gradient signs at the shared activations, where its paper defines it"
    needs_representation = True

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, leak: float = 0.0) -> None:
        super().__init__(tasks, task_weights)
        if not 0.0 <= leak <= 1.0:
            raise UserError(f"weighting.options.leak must be in [0, 1] for graddrop, got {leak}")
        self.leak = float(leak)
        self.representation: List[Tensor] = []

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        grads = grads.float()
        t = grads.shape[0]
        if not self.representation or sum(a.numel() for a in self.representation) != grads.shape[1]:
            raise UserError(
                "weighting graddrop drops gradient signs at the shared activations, but none came with these "
                "gradients; set weighting.grad_on=representation"
            )
        generator = self.generator()
        parts, offset = [], 0
        for a in self.representation:
            n, batch = a.numel(), a.shape[0]
            g = grads[:, offset : offset + n].reshape(t, batch, -1)
            offset += n
            separated = (g * a.reshape(batch, -1).sign().float()).sum(1)  # G_i: (T, positions)
            total = separated.abs().sum(0)
            purity = 0.5 * (1.0 + torch.where(total > 0, separated.sum(0) / torch.where(total > 0, total, 1.0), 0.0))
            u = torch.rand(purity.shape, generator=generator).to(purity.device, non_blocking=True)
            keep = ((purity > u) & (separated > 0)) | ((purity < u) & (separated < 0))
            mask = self.leak + (1.0 - self.leak) * keep.float()
            parts.append((g * mask.unsqueeze(1)).sum(0).reshape(-1))
        ones = torch.ones(t, device=grads.device)
        self.last_weights.copy_(ones)
        return torch.cat(parts), ones


class _ThreeSamples(GradientWeighting):
    """A stochastic method that needs independent estimates within one step: ``forward`` gets the task gradients of
    three batches, ``(3, T, D)``; the first two set the weights (their product is unbiased, unlike one batch's
    ``G G^T``), the third gives the update ``d = G_3^T last_weights`` and the heads' ``w = last_weights``."""

    samples = 3
    grad_on_modes = ("params",)
    grad_on_reason = (
        "pairs the task gradients of 3 different batches, which needs gradients with respect to the shared "
        "parameters (the representation's belong to each batch's own images)"
    )

    def _batches(self, grads: Tensor) -> Tensor:
        if grads.dim() != 3 or grads.shape[0] != self.samples or grads.shape[1] != self.num_tasks:
            raise ValueError(
                f"{type(self).__name__} takes ({self.samples}, {self.num_tasks}, D) gradients, got {tuple(grads.shape)}"
            )
        return grads.float()


def _number(value: float, name: str, method: str, low: float = 0.0, high: float = math.inf) -> float:
    """``value`` as a float in ``[low, high)`` (and finite), else a UserError naming the option."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (math.isfinite(number) and low <= number < high):
        bound = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g})"
        raise UserError(f"weighting.options.{name} must be a number {bound} for {method}, got {value!r}")
    return number


@WEIGHTINGS.register("modo")
class MoDo(_ThreeSamples):
    """MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023, Alg. 1): with the task gradients ``G_1, G_2, G_3`` of three
    independent batches, ``lambda <- Pi(lambda - gamma (G_1 G_2^T lambda + rho lambda))`` (``Pi``: the Euclidean
    projection onto the simplex; from ``lambda = 1/T``), then ``d = G_3^T lambda``.

    Defaults are LibMTL's (``MoDo_gamma``, ``MoDo_rho``). As in the paper, the step on ``lambda`` scales with the
    gradients (``gamma G_1 G_2^T``). ``w = last_weights = lambda``: the heads train on ``sum_t lambda_t L_t`` of the
    third batch, as the paper updates every parameter along ``G_3^T lambda`` (LibMTL gives them the mean over the
    three batches of ``sum_t L_t``). ``lambda`` is a buffer, checkpointed.
    """

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, gamma: float = 1e-3, rho: float = 0.1
    ) -> None:
        super().__init__(tasks, task_weights)
        self.gamma, self.rho = _number(gamma, "gamma", "modo"), _number(rho, "rho", "modo")
        self.register_buffer("lam", torch.full((self.num_tasks,), 1.0 / self.num_tasks))

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        g = self._batches(grads)
        lam = self.lam.double()
        lam = _project_simplex(lam - self.gamma * (solvers.gram(g[0], g[1]) @ lam + self.rho * lam))
        self.lam.copy_(lam)
        d, w = _combine(g[2], lam)
        self.last_weights.copy_(w)
        return d, w


@WEIGHTINGS.register("sdmgrad")
class SDMGrad(_ThreeSamples):
    """SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable Stochastic
    Algorithms", NeurIPS 2023, Alg. 1): the weights ``w`` of ``min_{w in simplex} |G^T w + lamda g_0|^2 / 2`` (``g_0``
    the mean gradient, the direction it is kept near) move by ``niter`` steps of projected SGD along the unbiased
    estimate ``G_1 (G_2^T w + lamda g_0(2))`` from two independent batches (the same pair for all ``niter`` steps);
    the third gives the update ``d = (G_3^T w + lamda g_0(3)) / (1 + lamda)`` (divided by ``1 + lamda`` as in the
    authors' code and LibMTL).

    As in LibMTL: ``G_1 G_2^T`` is divided by ``s^2``, ``s`` the mean over tasks of ``sqrt(max(g_1t . g_2t, 0))``
    (without LibMTL's ``+ 1e-8``, so that ``w`` does not depend on the gradients' scale); the steps are SGD with
    learning rate ``lr`` and heavy-ball ``momentum`` (its velocity from zero at each training step) followed by the
    projection onto the simplex; ``w`` starts from ``1/T`` and carries over between steps (a buffer, checkpointed).
    ``lamda`` (LibMTL's spelling: ``lambda`` is a Python keyword), ``niter``, ``lr`` and ``momentum`` default to
    LibMTL's values. ``w = last_weights = (w + lamda / T) / (1 + lamda)``, the coefficients of ``d``: the heads train
    on ``sum_t last_weights_t L_t`` of the third batch, as the paper updates every parameter along ``d`` (LibMTL gives
    them the sum over the three batches of ``sum_t L_t``).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        lamda: float = 0.3,
        niter: int = 20,
        lr: float = 5.0,
        momentum: float = 0.5,
    ) -> None:
        super().__init__(tasks, task_weights)
        if isinstance(niter, bool) or not isinstance(niter, int) or niter < 1:
            raise UserError(f"weighting.options.niter must be an integer >= 1 for sdmgrad, got {niter!r}")
        self.lamda, self.niter = _number(lamda, "lamda", "sdmgrad"), niter
        self.lr, self.momentum = _number(lr, "lr", "sdmgrad"), _number(momentum, "momentum", "sdmgrad", high=1.0)
        self.register_buffer("weights", torch.full((self.num_tasks,), 1.0 / self.num_tasks))

    @torch.no_grad()
    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:
        g = self._batches(grads)
        m = solvers.gram(g[0], g[1])
        s2 = m.diagonal().clamp_min(0.0).sqrt().mean() ** 2
        m = m / torch.where(s2 > 0, s2, torch.ones_like(s2))
        target = m.mean(1)  # G_1 g_0(2), scaled like m
        w = self.weights.double()
        velocity = torch.zeros_like(w)
        for _ in range(self.niter):
            velocity = self.momentum * velocity + (m @ w + self.lamda * target)
            w = _project_simplex(w - self.lr * velocity)
        self.weights.copy_(w)
        d, coefficients = _combine(g[2], (w + self.lamda / self.num_tasks) / (1.0 + self.lamda))
        self.last_weights.copy_(coefficients)
        return d, coefficients
