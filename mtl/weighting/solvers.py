"""Exact solvers for the T x T subproblems of the gradient-level weightings.

The gradients' Gram matrix ``M = G G^T`` is formed on their device in float64, then read to the host once per
step and solved there exactly: T is the number of tasks, so a T x T problem in float64 on the CPU costs far
less than the T backward passes that produced G, and an active-set method ends with the KKT conditions
holding to rounding instead of after a fixed number of iterations that badly scaled problems do not survive.
Every solver first divides M by its largest diagonal entry, so that its answer does not depend on the
gradients' global scale.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

TINY = 1e-300  # below every meaningful squared gradient norm in float64
RANK_TOL = 1e-12  # eigenvalues of M below T * RANK_TOL * max eigenvalue are zero: the float32 gradients' rounding
CHUNK = 1 << 20  # columns of G turned into float64 at a time
# a combination of the gradients shorter than this (times the longest) is the origin, at float32 precision
ORIGIN = 1e-6


def gram(grads: Tensor, other: Optional[Tensor] = None) -> Tensor:
    """``G G^T`` (``G H^T`` with ``other`` = H, of the same shape) in float64 on the gradients' device, ``(T, T)``, a
    chunk of columns at a time (bounded memory)."""
    t, d = grads.shape
    m = torch.zeros(t, t, dtype=torch.float64, device=grads.device)
    for start in range(0, d, CHUNK):
        g = grads[:, start : start + CHUNK].double()
        m.addmm_(g, g.T if other is None else other[:, start : start + CHUNK].double().T)
    return m


def host(m: Tensor) -> Tensor:
    """``M`` on the CPU in float64, divided by its largest diagonal entry (all zeros stay zeros)."""
    m = m.detach().to("cpu", torch.float64)
    return m / max(float(m.diagonal().max()), TINY) if m.numel() else m


def nonzero_eigen(m: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(lambda, V, keep)`` of the symmetric PSD ``m`` (CPU float64): its eigen-decomposition, and which eigenvalues
    count as non-zero, those above ``lambda_max * T * RANK_TOL`` (below is the float32 gradients' rounding)."""
    lam, vec = torch.linalg.eigh(m)
    keep = lam > max(float(lam.max()), 0.0) * m.shape[0] * RANK_TOL
    return lam, vec, keep


def active_set_qp(h: Tensor, q: Tensor, simplex: bool = False, max_iter: Optional[int] = None) -> Tensor:
    """Row k of the result: ``argmin_x x^T H x / 2 + q_k^T x`` over ``x >= 0`` (and ``sum(x) = 1`` with
    ``simplex``), for each row ``q_k`` of ``q`` (K, T); H is symmetric positive semi-definite (CPU, float64).

    Lawson & Hanson's active-set method (Solving Least Squares Problems, 1974, ch. 23; in the Gram form of
    Bro & de Jong 1997), with the sum constraint carried in a bordered KKT system. The K problems step together,
    one batched solve per step. A variable joins the passive set P when its (reduced) gradient is the most
    negative; the subproblem on P is solved exactly; a step that would leave the feasible set stops at its
    boundary and drops the variables that reach zero. It stops when no reduced gradient is below
    ``-tol``, i.e. when the KKT conditions hold to rounding. A variable dropped by a zero-length step (which only
    rounding makes possible) may not rejoin until the point moves, which prevents cycling.
    """
    k, t = q.shape
    if max_iter is None:
        max_iter = 5 * t + 20
    scale = max(float(h.abs().max()) if h.numel() else 0.0, float(q.abs().max()) if q.numel() else 0.0, TINY)
    tol = 1e-13 * t * scale
    rows = torch.arange(k)
    x = torch.zeros(k, t, dtype=h.dtype)
    passive = torch.zeros(k, t, dtype=torch.bool)
    if simplex:
        start = (h.diagonal() / 2 + q).argmin(1)  # the best vertex
        x[rows, start] = 1.0
        passive[rows, start] = True
    blocked = torch.zeros(k, t, dtype=torch.bool)
    active = torch.ones(k, dtype=torch.bool)
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        z = _subproblem(h, q, passive, simplex)
        bad = active.unsqueeze(1) & passive & (z <= 0)
        step = bad.any(1)
        feasible = active & ~step
        if bool(feasible.any()):
            moved = feasible & (z != x).any(1)
            blocked = blocked & ~moved.unsqueeze(1)
            x = torch.where(feasible.unsqueeze(1), z, x)
            grad = x @ h + q
            if simplex:
                grad = grad - (x * grad).sum(1, keepdim=True)  # the reduced gradient (the sum's multiplier removed)
            grad = torch.where(passive | blocked, torch.zeros_like(grad), grad)
            best = grad.argmin(1)
            join = feasible & (grad[rows, best] < -tol)
            active = active & ~(feasible & ~join)
            passive[rows[join], best[join]] = True
        if bool(step.any()):
            ratio = torch.where(bad, x / (x - z).clamp_min(TINY), torch.full_like(x, math.inf))
            alpha = ratio.amin(1, keepdim=True).clamp(0.0, 1.0)
            hit = bad & (ratio <= alpha)
            new = (x + alpha * (z - x)).clamp_min(0.0)
            new = torch.where(hit, torch.zeros_like(new), new)
            if simplex:
                new = new / new.sum(1, keepdim=True)
            drop = step.unsqueeze(1) & passive & (hit | (new <= 0))
            x = torch.where(step.unsqueeze(1), new, x)
            passive = passive & ~drop
            stuck = step & (alpha.squeeze(1) <= 0)  # a zero-length step: keep what it dropped out until x moves
            blocked = blocked | (drop & stuck.unsqueeze(1))
    return x


def _subproblem(h: Tensor, q: Tensor, passive: Tensor, simplex: bool) -> Tensor:
    """The unconstrained minimiser on each row's passive set (zeros elsewhere): ``H_PP z_P = -q_P``, bordered by
    ``sum(z) = 1`` for the simplex."""
    k, t = q.shape
    both = passive.unsqueeze(2) & passive.unsqueeze(1)
    eye = torch.eye(t + 1, dtype=h.dtype).expand(k, t + 1, t + 1).clone()
    a = eye
    a[:, :t, :t] = torch.where(both, h.expand(k, t, t), eye[:, :t, :t])
    rhs = torch.zeros(k, t + 1, dtype=h.dtype)
    rhs[:, :t] = torch.where(passive, -q, torch.zeros_like(q))
    if simplex:
        border = passive.to(h.dtype)
        a[:, :t, t] = border
        a[:, t, :t] = border
        a[:, t, t] = 0.0
        rhs[:, t] = 1.0
    sol, info = torch.linalg.solve_ex(a, rhs.unsqueeze(-1))
    broken = (info != 0) | ~torch.isfinite(sol).all(dim=(1, 2))
    if bool(broken.any()):  # a singular subproblem (dependent gradients): least squares keeps it finite
        sol[broken] = torch.linalg.lstsq(a[broken], rhs[broken].unsqueeze(-1), driver="gelsd").solution
    return torch.where(passive, sol[:, :t, 0], torch.zeros(k, t, dtype=h.dtype))


def min_norm_simplex(m: Tensor) -> Tensor:
    """``argmin_{a in simplex} a^T M a``: the convex combination of the gradients of least norm (CPU float64)."""
    m = host(m)
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=torch.float64)
    return active_set_qp(m, torch.zeros(1, t, dtype=torch.float64), simplex=True)[0]


def dual_cone_weights(m: Tensor, lower: Tensor) -> Tensor:
    """Column k: ``argmin_{v >= lower[:, k]} v^T M v`` (CPU float64, (T, K)). With ``lower = e_k``, ``G^T v`` is
    the projection of ``g_k`` onto the dual cone ``{x : G x >= 0}`` (UPGrad). Solved for ``y = v - lower >= 0``."""
    m = host(m)
    lower = lower.detach().to("cpu", torch.float64)
    y = active_set_qp(m, (m @ lower).T)
    return lower + y.T


def cagrad_weights(m: Tensor, c: float) -> Tensor:
    """``argmin_{w in simplex} b^T w + r sqrt(w^T M w)`` with ``b = M 1 / T`` and ``r = c |g0|`` (CAGrad's dual;
    g0 is the mean gradient, ``|g0|^2 = 1^T M 1 / T^2``). CPU float64.

    Majorize-minimize from the uniform w: at ``s = |g_w|``, ``sqrt(q) <= s/2 + q/(2s)`` turns the problem into a
    QP over the simplex, solved exactly (``active_set_qp``); F decreases at every step. After each step the
    support S of the QP's answer is tried in closed form: on S the stationarity conditions are
    ``M_SS w + nu 1 = -t b_S``, ``1^T w = 1`` with ``t = |g_w| / r``, so ``w = u + t v`` and ``|g_w|^2 = r^2 t^2``
    is a quadratic in t. A root whose w is feasible and satisfies every KKT condition is the exact minimiser.
    """
    m = host(m)
    t = m.shape[0]
    w = torch.full((t,), 1.0 / t, dtype=torch.float64)
    b = m.mean(1)
    r = c * math.sqrt(max(float(b.mean()), 0.0))
    if t == 1 or r <= 0:
        return w
    if c >= 1:  # F >= (r - |g0|) |g_w| >= 0: the minimum is 0, at the origin when the hull holds it
        a = active_set_qp(m, torch.zeros(1, t, dtype=m.dtype), simplex=True)[0]
        if float(a @ m @ a) <= ORIGIN**2:
            return a
    value = _cagrad_objective(m, b, r, w)
    for _ in range(100):
        s = math.sqrt(max(float(w @ m @ w), 0.0))
        if s <= 1e-150:
            return w
        new = active_set_qp((r / s) * m, b.unsqueeze(0), simplex=True)[0]
        exact = _cagrad_on_support(m, b, r, new > 0)
        if exact is not None:
            return exact
        new_value = _cagrad_objective(m, b, r, new)
        if not new_value < value:
            break
        w, value = new, new_value
    return w


def _cagrad_objective(m: Tensor, b: Tensor, r: float, w: Tensor) -> float:
    return float(b @ w) + r * math.sqrt(max(float(w @ m @ w), 0.0))


def _cagrad_on_support(m: Tensor, b: Tensor, r: float, support: Tensor) -> Optional[Tensor]:
    """The exact minimiser with support ``support``, or None when no root of the support's quadratic is one."""
    t = m.shape[0]
    idx = support.nonzero().squeeze(1)
    n = idx.numel()
    a = torch.zeros(n + 1, n + 1, dtype=m.dtype)
    a[:n, :n] = m[idx][:, idx]
    a[:n, n] = a[n, :n] = 1.0
    rhs = torch.zeros(n + 1, 2, dtype=m.dtype)
    rhs[n, 0] = 1.0
    rhs[:n, 1] = -b[idx]
    sol, info = torch.linalg.solve_ex(a, rhs)
    if int(info) != 0 or not bool(torch.isfinite(sol).all()):
        return None
    u = torch.zeros(t, dtype=m.dtype).index_copy(0, idx, sol[:n, 0])
    v = torch.zeros(t, dtype=m.dtype).index_copy(0, idx, sol[:n, 1])
    qa, qb, qc = float(v @ m @ v) - r * r, 2 * float(u @ m @ v), float(u @ m @ u)
    if abs(qa) < 1e-300:
        roots = [-qc / qb] if qb != 0 else []
    else:
        disc = qb * qb - 4 * qa * qc
        if disc < 0:
            return None
        roots = [(-qb + math.sqrt(disc)) / (2 * qa), (-qb - math.sqrt(disc)) / (2 * qa)]
    for root in roots:
        w = u + root * v
        if not root > 0 or not bool((w >= -1e-12).all()):
            continue
        w = w.clamp_min(0.0)
        w = w / w.sum()
        s = math.sqrt(max(float(w @ m @ w), 0.0))
        if s <= ORIGIN:  # near the origin F is not differentiable, and rounding can fake a root there
            continue
        grad = b + (r / s) * (m @ w)  # F's gradient: equal on the support, no smaller off it at the minimiser
        level = float(w @ grad)
        if bool((grad[~support] >= level - 1e-10 * float(grad.abs().max())).all()) and float(
            (grad[support] - level).abs().max()
        ) <= 1e-8 * float(grad.abs().max()):
            return w
    return None


def correlation(m: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(C, n, valid)``: norms ``n = sqrt(diag M)``, ``valid = n > 0`` and ``C = D^-1 M D^-1`` (D = diag(n)),
    with the rows/columns of zero gradients replaced by those of the identity."""
    n = m.diagonal().clamp_min(0.0).sqrt()
    valid = n > n.amax() * 1e-12
    inv = torch.where(valid, 1.0 / torch.where(valid, n, 1.0), 0.0)
    c = m * inv.unsqueeze(0) * inv.unsqueeze(1) + torch.diag((~valid).to(m.dtype))
    return c, n, valid


def nash_newton(m: Tensor, max_iter: int = 100, ridge: float = 1e-12) -> Tensor:
    """``alpha > 0`` with ``alpha_i (M alpha)_i = 1`` (Nash-MTL's bargaining solution), CPU float64.

    The condition is invariant to diagonal scaling, so it is solved on the correlation matrix C
    (``beta_i (C beta)_i = 1``, ``alpha = beta / |g_i|``): ``beta`` minimises the self-concordant
    ``f(b) = b^T C b / 2 - sum(log b)``; damped Newton steps ``b -= H^{-1} grad / (1 + lambda)`` (lambda: the
    Newton decrement) stay in ``b > 0`` and converge quadratically; they stop when lambda^2 is at rounding level.
    A tiny ridge keeps exactly cancelling gradients finite (no solution exists then); a task with a zero gradient
    gets the weight of a gradient of norm ``1e-6 * max |g|`` (1 when all are zero).
    """
    m = m.detach().to("cpu", torch.float64)
    t = m.shape[0]
    c, n, valid = correlation(m)
    c = c + ridge * torch.eye(t, dtype=m.dtype)
    b = torch.full((t,), math.sqrt(t / max(float(c.sum()), 1e-12)), dtype=m.dtype)
    for _ in range(max_iter):
        grad = c @ b - 1.0 / b
        hess = c + torch.diag(1.0 / (b * b))
        step = torch.linalg.solve(hess, grad)
        dec2 = max(float(grad @ step), 0.0)
        b = b - step / (1.0 + math.sqrt(dec2))
        if dec2 < 1e-28 * t:
            break
    n_max = float(n.amax())
    floor = 1e-6 * n_max if n_max > 0 else 1.0
    return b / torch.where(valid, n, torch.full_like(n, floor))


def fair_newton(m: Tensor, p: float, max_iter: int = 200, ridge: float = 1e-12) -> Tensor:
    """``alpha > 0`` with ``(M alpha)_i = alpha_i^(-1/p)`` (FairGrad's alpha-fair weights; p = 1 is Nash-MTL's
    equation), CPU float64.

    Solved on ``M~ = M / s`` (s: the largest diagonal entry), then ``alpha = s^(-p/(p+1)) alpha~``, which solves the
    original. ``alpha~`` minimises the strictly convex ``a^T M~ a / 2 - sum phi(a_i)`` with ``phi' = a^(-1/p)``
    (``phi = log`` for p = 1), from the orthogonal gradients' answer: Newton steps, halved until they stay positive
    and decrease the objective (near the minimum, only positive), stopped when the Newton decrement is at rounding
    level. A tiny ridge, relative to each task's squared norm, keeps
    cancelling gradients finite; a zero gradient gets the weight of one of norm ``1e-6 * max |g|`` (ones when all are
    zero).
    """
    m = m.detach().to("cpu", torch.float64)
    t = m.shape[0]
    s = float(m.diagonal().max())
    if not s > 0:  # every gradient is zero: nothing to balance
        return torch.ones(t, dtype=m.dtype)
    mt = m / s
    diag = mt.diagonal()
    # a relative ridge (scale-free per task); a zero gradient counts as one of norm 1e-6 * max |g|, as in nash_newton
    mt = mt + torch.diag(ridge * diag + torch.where(diag < 1e-12, 1e-12, 0.0))
    q = 1.0 / p

    def phi(a: Tensor) -> Tensor:
        return torch.log(a) if p == 1 else a ** (1 - q) / (1 - q)

    def objective(a: Tensor) -> float:
        return float(a @ mt @ a / 2 - phi(a).sum())

    a = mt.diagonal() ** (-p / (p + 1))  # the answer for orthogonal gradients: a close start
    value = objective(a)
    for _ in range(max_iter):
        grad = mt @ a - a ** (-q)
        hess = mt + torch.diag(q * a ** (-q - 1))
        step = torch.linalg.solve(hess, grad)
        dec2 = float(grad @ step)  # the Newton decrement squared: about twice the distance to the minimum
        if not dec2 > 1e-28 * t:
            break
        size = 1.0
        while size > 1e-12:
            trial = a - size * step
            if bool((trial > 0).all()):
                # close to the minimum a full step converges quadratically; there the objective's change can be
                # below its rounding, so only the sign constraint is checked
                trial_value = objective(trial)
                if dec2 < 1e-6 or trial_value <= value:
                    break
            size /= 2
        else:
            break
        a, value = trial, trial_value
    return a * s ** (-p / (p + 1))
