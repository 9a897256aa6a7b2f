"""Small fixed-iteration solvers on T x T Gram matrices for the gradient-level weightings.

Everything runs on the input's device with a fixed amount of work: no convergence checks, no host syncs
(``torch.linalg.solve_ex(check_errors=False)`` instead of ``solve``, Jacobi instead of ``eigh``). Inputs
are float64 ``(T, T)`` symmetric positive semi-definite matrices ``M = G G^T``.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import List, Tuple

import torch
from torch import Tensor

TINY = 1e-30  # floor for scales of all-zero gradients


def gram(grads: Tensor) -> Tensor:
    """``G G^T`` in float64, ``(T, T)``."""
    g = grads.double()
    return g @ g.T


def normalized(m: Tensor) -> Tuple[Tensor, Tensor]:
    """``(M / s, s)`` with ``s`` the mean diagonal (floored), so that solvers see entries of order one."""
    s = m.diagonal().mean().clamp_min(TINY)
    return m / s, s


def lipschitz(m: Tensor) -> Tensor:
    """An upper bound of the largest eigenvalue of a symmetric matrix: min(max row sum, Frobenius norm)."""
    return torch.minimum(m.abs().sum(-1).amax(), torch.linalg.matrix_norm(m)).clamp_min(TINY)


def project_simplex(x: Tensor) -> Tensor:
    """Euclidean projection of each row of ``x`` onto the probability simplex (sort-based, branch-free)."""
    u, _ = torch.sort(x, dim=-1, descending=True)
    css = u.cumsum(-1) - 1.0
    k = torch.arange(1, x.shape[-1] + 1, device=x.device, dtype=x.dtype)
    rho = (u - css / k > 0).sum(-1, keepdim=True).clamp_min(1)
    theta = css.gather(-1, rho - 1) / rho.to(x.dtype)
    return (x - theta).clamp_min(0.0)


def _momenta(iters: int) -> List[float]:
    """FISTA extrapolation coefficients (plain Python floats, no device work)."""
    t, out = 1.0, []
    for _ in range(iters):
        t_next = (1.0 + math.sqrt(1.0 + 4.0 * t * t)) / 2.0
        out.append((t - 1.0) / t_next)
        t = t_next
    return out


def min_norm_simplex(m: Tensor, iters: int = 100) -> Tensor:
    """``argmin_{a in simplex} a^T M a`` (the min-norm point of the convex hull of the rows of G).

    Closed form for T = 2; otherwise accelerated projected gradient (FISTA) from the uniform point.
    """
    t = m.shape[0]
    if t == 1:
        return torch.ones(1, dtype=m.dtype, device=m.device)
    m, _ = normalized(m)
    if t == 2:
        denom = (m[0, 0] - 2 * m[0, 1] + m[1, 1]).clamp_min(1e-12)
        a0 = ((m[1, 1] - m[0, 1]) / denom).clamp(0.0, 1.0)
        return torch.stack([a0, 1.0 - a0])
    step = 1.0 / lipschitz(m)
    x = torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)
    y = x
    for mom in _momenta(iters):
        x_new = project_simplex(y - step * (m @ y))
        y = x_new + mom * (x_new - x)
        x = x_new
    return x


def _quadratic(m: Tensor, z: Tensor) -> Tensor:
    """``z_k^T M z_k`` for each column k of z, as (1, K)."""
    return (z * (m @ z)).sum(0, keepdim=True)


def box_qp(m: Tensor, lower: Tensor, iters: int = 100) -> Tensor:
    """Column-wise ``argmin_{v >= lower[:, k]} v^T M v`` for each column k of ``lower`` (T, K).

    FISTA with clamping, then one active-set polish: with the free set F = {v > lower} from FISTA, solve
    ``M_FF v_F = -M_FA lower_A`` exactly (masked, batched ``solve_ex``) and clamp again. The polish makes
    the KKT conditions ``(M v)_F = 0`` hold to rounding whenever FISTA found the right active set.
    """
    m, _ = normalized(m)
    step = 1.0 / lipschitz(m)
    x = lower.clone()
    y = x
    for mom in _momenta(iters):
        x_new = torch.maximum(y - step * (m @ y), lower)
        y = x_new + mom * (x_new - x)
        x = x_new
    free = (x > lower + 1e-9).T  # (K, T): row k = free set of problem k
    both = free.unsqueeze(-1) & free.unsqueeze(-2)
    eye = torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
    h = torch.where(both, m, eye)  # (K, T, T)
    fixed = torch.where(free, 0.0, lower.T)  # (K, T)
    rhs = torch.where(free, -(fixed @ m), lower.T)  # M symmetric: (M fixed)_i for each problem
    h = h + 1e-12 * eye
    v, _ = torch.linalg.solve_ex(h, rhs.unsqueeze(-1), check_errors=False)
    polished = torch.maximum(v.squeeze(-1), lower.T).T
    ok = torch.isfinite(polished).all(0, keepdim=True)
    # Keep whichever of FISTA / polished has the lower objective (per column).
    better = ok & (torch.nan_to_num(_quadratic(m, polished), nan=math.inf) <= _quadratic(m, x))
    return torch.where(better, polished, x)


def correlation(m: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``(C, n, valid)``: norms ``n = sqrt(diag M)``, ``valid = n > 0`` and ``C = D^-1 M D^-1`` (D = diag(n)),
    with the rows/columns of zero gradients replaced by those of the identity."""
    n = m.diagonal().clamp_min(0.0).sqrt()
    valid = n > n.amax() * 1e-12
    inv = torch.where(valid, 1.0 / torch.where(valid, n, 1.0), 0.0)
    c = m * inv.unsqueeze(0) * inv.unsqueeze(1) + torch.diag((~valid).to(m.dtype))
    return c, n, valid


def nash_newton(m: Tensor, iters: int = 20, ridge: float = 1e-10) -> Tensor:
    """``alpha > 0`` with ``alpha_i (M alpha)_i = 1`` (Nash-MTL's bargaining solution).

    The condition is invariant to diagonal scaling, so it is solved on the correlation matrix C
    (``beta_i (C beta)_i = 1``, ``alpha = beta / |g_i|``): ``beta`` minimises the self-concordant
    ``f(b) = b^T C b / 2 - sum(log b)``; damped Newton steps ``b -= H^{-1} grad / (1 + lambda)`` (lambda: the
    Newton decrement) stay in ``b > 0`` and converge quadratically. A tiny ridge keeps exactly cancelling
    gradients finite; a task with a zero gradient gets the weight of a gradient of norm
    ``1e-6 * max |g|`` (1 when all are zero).
    """
    t = m.shape[0]
    c, n, valid = correlation(m)
    c = c + ridge * torch.eye(t, dtype=m.dtype, device=m.device)
    b = torch.full((t,), (t / c.sum().clamp_min(1e-12)).sqrt(), dtype=m.dtype, device=m.device)
    for _ in range(iters):
        grad = c @ b - 1.0 / b
        hess = c + torch.diag(1.0 / (b * b))
        step, _ = torch.linalg.solve_ex(hess, grad.unsqueeze(-1), check_errors=False)
        step = step.squeeze(-1)
        dec = (grad @ step).clamp_min(0.0).sqrt()
        b = b - step / (1.0 + dec)
    n_max = n.amax()
    floor = torch.where(n_max > 0, 1e-6 * n_max, 1.0)
    return b / torch.where(valid, n, floor)


def cagrad_weights(m: Tensor, c: float, iters: int = 100) -> Tensor:
    """``argmin_{w in simplex} w^T M 1/T + c ||g0|| sqrt(w^T M w)`` (CAGrad's dual problem, g0 = mean gradient).

    Accelerated projected gradient from uniform w with a majorize-minimize step: at the current point
    ``sqrt(q) <= sqrt(q0) + (q - q0) / (2 sqrt(q0))`` gives a quadratic upper bound of curvature
    ``c ||g0|| lambda_max(M) / ||g_w||``, whose inverse is the step.
    """
    t = m.shape[0]
    m, _ = normalized(m)
    b = m.mean(1)
    r = c * b.mean().clamp_min(0.0).sqrt()  # c ||g0|| since ||g0||^2 = 1^T M 1 / T^2
    lmax = lipschitz(m)
    x = torch.full((t,), 1.0 / t, dtype=m.dtype, device=m.device)
    y = x
    for mom in _momenta(iters):
        mw = m @ y
        norm = (y @ mw).clamp_min(1e-20).sqrt()
        x_new = project_simplex(y - (b + r * mw / norm) / (r * lmax / norm + 1e-12))
        y = x_new + mom * (x_new - x)
        x = x_new
    return x


@lru_cache(maxsize=None)
def _rounds(t: int) -> Tuple[Tuple[Tuple[int, ...], Tuple[int, ...]], ...]:
    """Round-robin schedule: each round is a set of disjoint pairs (p < q) covering all pairs once per sweep."""
    n = t + (t % 2)
    players = list(range(n))
    rounds = []
    for _ in range(n - 1):
        pairs = [(players[i], players[n - 1 - i]) for i in range(n // 2)]
        pairs = [(min(p, q), max(p, q)) for p, q in pairs if p < t and q < t]
        rounds.append((tuple(p for p, _ in pairs), tuple(q for _, q in pairs)))
        players = [players[0], players[-1]] + players[1:-1]
    return tuple(rounds)


def sym_eig(m: Tensor, sweeps: int | None = None) -> Tuple[Tensor, Tensor]:
    """Eigenvalues and eigenvectors (columns) of a symmetric matrix by parallel cyclic Jacobi.

    Used instead of ``torch.linalg.eigh``, whose error check syncs with the host on CUDA. A fixed number of
    sweeps (default ``8 + ceil(log2 T)``; Jacobi converges quadratically) gives float64 accuracy for the
    small T here. Eigenvalues are not sorted.
    """
    t = m.shape[0]
    if sweeps is None:
        sweeps = 8 + math.ceil(math.log2(max(t, 2)))
    a = m.clone()
    v = torch.eye(t, dtype=m.dtype, device=m.device)
    rounds = [(torch.tensor(p, dtype=torch.long, device=m.device), torch.tensor(q, dtype=torch.long, device=m.device))
              for p, q in _rounds(t) if p]
    for _ in range(sweeps):
        for p, q in rounds:
            app, aqq, apq = a[p, p], a[q, q], a[p, q]
            diff = aqq - app
            sign = torch.where(diff >= 0, 1.0, -1.0).to(m.dtype)
            theta = 0.5 * torch.atan2(2.0 * apq * sign, diff.abs())  # smallest rotation zeroing a[p, q]
            c, s = torch.cos(theta), torch.sin(theta)
            j = torch.eye(t, dtype=m.dtype, device=m.device)
            j = j.index_put((p, p), c).index_put((q, q), c).index_put((p, q), s).index_put((q, p), -s)
            a = j.T @ a @ j
            v = v @ j
    return a.diagonal(), v
