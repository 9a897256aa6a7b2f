"""Exact references for the gradient-balancing methods, written independently of ``mtl.weighting``.

Brute force in float64: every support (subset of tasks) is tried and the best feasible candidate kept. No
iteration, no tolerance-driven search: a candidate is either feasible or not, and among feasible points the
objective decides. Used by ``tests/weighting/test_weighting_exact.py`` and ``benchmarks/solver_accuracy.py``.
Each function takes the (T, D) gradients (any dtype) and works from their float64 Gram matrix. The stochastic
methods MoDo and SDMGrad are iterations by definition: ``modo_steps`` and ``sdmgrad_steps`` follow their papers' loops
step by step in float64, on the gradient vectors rather than a Gram matrix, projecting by brute force
(``simplex_projection``).
"""

from __future__ import annotations

import itertools
import math
from typing import Iterator, List, Sequence, Tuple

import torch
from torch import Tensor


def gram64(grads: Tensor) -> Tensor:
    g = grads.double()
    return g @ g.T


def _supports(t: int) -> Iterator[Tensor]:
    """Index tensors of every non-empty subset of range(t), grouped by size: (n_subsets, k) per size k."""
    for k in range(1, t + 1):
        yield torch.tensor(list(itertools.combinations(range(t), k)), dtype=torch.long)


def _bordered(m: Tensor, idx: Tensor) -> Tensor:
    """(n, k+1, k+1): [[M_SS, 1], [1^T, 0]] for each support row of idx."""
    n, k = idx.shape
    sub = m[idx.unsqueeze(-1), idx.unsqueeze(-2)]
    out = torch.zeros(n, k + 1, k + 1, dtype=m.dtype)
    out[:, :k, :k] = sub
    out[:, :k, k] = 1.0
    out[:, k, :k] = 1.0
    return out


def min_norm_point(grads: Tensor) -> Tuple[Tensor, Tensor]:
    """MGDA's ``argmin_{a in simplex} |G^T a|^2``: ``(a, G^T a)``, both float64.

    For each support S the affine minimiser on S solves [[M_SS, 1], [1^T, 0]] [a; mu] = [0; 1]. The minimum
    norm point lies in the relative interior of the hull of an affinely independent support (Caratheodory),
    whose bordered matrix is non-singular; so the feasible (a >= 0) candidate of least norm is the answer.
    """
    m = gram64(grads)
    t = m.shape[0]
    best, best_a = float("inf"), None
    for idx in _supports(t):
        n, k = idx.shape
        rhs = torch.zeros(n, k + 1, 1, dtype=m.dtype)
        rhs[:, k] = 1.0
        sol, info = torch.linalg.solve_ex(_bordered(m, idx), rhs)
        a_s = sol[:, :k, 0]
        ok = (info == 0) & torch.isfinite(a_s).all(1) & (a_s >= -1e-12).all(1)
        if not ok.any():
            continue
        a = torch.zeros(n, t, dtype=m.dtype).scatter(1, idx, a_s.clamp_min(0.0))
        a = a[ok] / a[ok].sum(1, keepdim=True)
        value = ((a @ m) * a).sum(1)
        i = int(value.argmin())
        if float(value[i]) < best:
            best, best_a = float(value[i]), a[i]
    return best_a, best_a @ grads.double()


def cone_projection(grads: Tensor, i: int) -> Tensor:
    """The projection of ``g_i`` onto the dual cone ``{x : G x >= 0}``, as float64 (D,)."""
    return cone_projection_of(grads, torch.eye(grads.shape[0], dtype=torch.float64)[i])


def cone_projection_of(grads: Tensor, p: Tensor) -> Tensor:
    """The projection of ``u = G^T p`` onto the dual cone ``{x : G x >= 0}``, as float64 (D,).

    By the KKT conditions the projection is ``u`` projected onto the subspace ``{x : g_j . x = 0, j in A}``
    of its active set A. Every A (the empty one too) gives a candidate ``x_A = u - G_A^T c`` with
    ``M_AA c = (M p)_A`` (least squares for dependent rows); each lies no farther from ``u`` than the projection
    unless it leaves the cone, so the feasible candidate closest to ``u`` is the answer.
    """
    m = gram64(grads)
    t = m.shape[0]
    p = p.double()
    mp = m @ p  # G u
    coefs = [torch.zeros(1, t, dtype=m.dtype)]
    for idx in _supports(t):
        sub = m[idx.unsqueeze(-1), idx.unsqueeze(-2)]
        c_s = torch.linalg.lstsq(sub, mp[idx].unsqueeze(-1), driver="gelsd").solution[..., 0]
        coefs.append(torch.zeros(idx.shape[0], t, dtype=m.dtype).scatter(1, idx, c_s))
    c = torch.cat(coefs)
    cm = c @ m
    dist2 = (cm * c).sum(1)  # |x_A - u|^2 = c^T M c
    gx = mp.unsqueeze(0) - cm  # G x_A
    norms = m.diagonal().clamp_min(0).sqrt()
    ok = (gx >= -1e-10 * norms * float(p @ mp).__abs__() ** 0.5).all(1)
    best = int(torch.where(ok, dist2, torch.full_like(dist2, float("inf"))).argmin())
    return p @ grads.double() - c[best] @ grads.double()


def dualproj_direction(grads: Tensor) -> Tensor:
    """DualProj: the mean gradient projected onto the dual cone."""
    t = grads.shape[0]
    return cone_projection_of(grads, torch.full((t,), 1.0 / t, dtype=torch.float64))


def config_direction(grads: Tensor) -> Tensor:
    """ConFIG from its definition in the gradients' space: ``e`` = unit vector of ``pinv(U) 1`` (an SVD of the
    (T, D) unit gradients; singular values below ``sqrt(T * 1e-12)`` of the largest count as zero: float32 rounding),
    ``d = (sum_i g_i . e) e``; 0 when ``|pinv(U) 1|^2 <= T * 1e-12`` (unit gradients that cancel)."""
    g = grads.double()
    t = g.shape[0]
    u = g / g.norm(dim=1, keepdim=True)
    direction = torch.linalg.pinv(u, rtol=(t * 1e-12) ** 0.5) @ torch.ones(t, dtype=torch.float64)
    if float(direction @ direction) <= t * 1e-12:  # the unit gradients cancel (to float32 rounding): no direction
        return torch.zeros(g.shape[1], dtype=torch.float64)
    e = direction / direction.norm()
    return (g @ e).sum() * e


def upgrad_direction(grads: Tensor, weights: Tensor | None = None) -> Tensor:
    """UPGrad's ``sum_i p_i proj(g_i)`` with ``p`` uniform (1/T) unless given."""
    t = grads.shape[0]
    p = torch.full((t,), 1.0 / t, dtype=torch.float64) if weights is None else weights.double()
    return sum(p[i] * cone_projection(grads, i) for i in range(t))


def cagrad_direction(grads: Tensor, c: float) -> Tuple[Tensor, float]:
    """CAGrad's ``d = g0 + c |g0| g_w / |g_w|`` (before rescaling) and the optimal value of its dual
    ``F(w) = g_w . g0 + c |g0| |g_w|`` over the simplex.

    On a support S, stationarity of F reads ``M_SS w + nu 1 = -t b_S``, ``1^T w = 1`` with ``t = |g_w| / r``,
    ``b = M 1 / T`` and ``r = c |g0|``: ``w = u + t v`` is affine in t, and ``|g_w|^2 = r^2 t^2`` is a quadratic
    in t. Every positive root of every support with a non-singular bordered matrix is a candidate; the
    feasible one (w >= 0) of least F is the minimiser. The origin (F = 0) is a candidate when it is in the hull.
    """
    m = gram64(grads)
    t = m.shape[0]
    b = m.mean(1)
    g0 = grads.double().mean(0)
    r = c * float(b.mean().clamp_min(0).sqrt())
    if r == 0:
        return g0, float(g0 @ g0)
    best, best_w = float("inf"), None
    for idx in _supports(t):
        n, k = idx.shape
        rhs = torch.zeros(n, k + 1, 2, dtype=m.dtype)
        rhs[:, k, 0] = 1.0
        rhs[:, :k, 1] = -b[idx]
        sol, info = torch.linalg.solve_ex(_bordered(m, idx), rhs)
        u = torch.zeros(n, t, dtype=m.dtype).scatter(1, idx, sol[:, :k, 0])
        v = torch.zeros(n, t, dtype=m.dtype).scatter(1, idx, sol[:, :k, 1])
        qa = ((v @ m) * v).sum(1) - r * r
        qb = 2 * ((u @ m) * v).sum(1)
        qc = ((u @ m) * u).sum(1)
        disc = (qb * qb - 4 * qa * qc).clamp_min(0).sqrt()
        for root in ((-qb + disc) / (2 * qa), (-qb - disc) / (2 * qa)):
            w = u + root.unsqueeze(1) * v
            ok = (info == 0) & (root > 0) & torch.isfinite(w).all(1) & (w >= -1e-12).all(1)
            if not ok.any():
                continue
            w = w[ok].clamp_min(0.0)
            w = w / w.sum(1, keepdim=True)
            value = w @ b + r * ((w @ m) * w).sum(1).clamp_min(0).sqrt()
            j = int(value.argmin())
            if float(value[j]) < best:
                best, best_w = float(value[j]), w[j]
    a, x = min_norm_point(grads)
    if float(x @ x) <= 1e-12 * float(m.diagonal().max()) and (c >= 1 or best >= 0):
        # the origin is in the hull (at float32 precision: within 1e-6 of the longest gradient), where F = 0, the
        # minimum when c >= 1 (F >= (r - |g0|) |g_w|); g_w = 0 gives d = g0
        return g0, 0.0
    gw = best_w @ grads.double()
    return g0 + r * gw / gw.norm(), best


RANK_TOL = 1e-12  # sigma_i^2 <= T * 1e-12 * sigma_max^2: below the float32 rounding of the gradients, rank-deficient


def aligned_direction(grads: Tensor, weights: Tensor | None = None) -> Tensor:
    """Aligned-MTL's ``d = (sigma_min U V^T)^T p`` from the SVD ``G = U S V^T``, over the singular values that are
    not zero (``RANK_TOL``)."""
    g = grads.double()
    t = g.shape[0]
    p = torch.full((t,), 1.0 / t, dtype=torch.float64) if weights is None else weights.double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    keep = s * s > s.max() ** 2 * t * RANK_TOL
    u, s, vh = u[:, keep], s[keep], vh[keep]
    return s.min() * (p @ u) @ vh


def surgery_reference(grads: Tensor, order: Tensor, adjust) -> Tensor:
    """PCGrad's and GradVac's sequential loop as their papers write it, in float64: for each task i, the other
    tasks j in ``order[i]``, ``p = adjust(i, j, p, g_j)``; returns the sum of the adjusted gradients."""
    g = grads.double()
    out = torch.zeros(g.shape[1], dtype=torch.float64)
    for i in range(g.shape[0]):
        p = g[i].clone()
        for j in order[i].tolist():
            p = adjust(i, j, p, g[j])
        out += p
    return out


def pcgrad_projection(i: int, j: int, p: Tensor, gj: Tensor) -> Tensor:
    """Remove from p its component along g_j when they conflict (Yu et al. 2020, Alg. 1)."""
    dot = float(p @ gj)
    return p - dot / float(gj @ gj) * gj if dot < 0 else p


KINDS = ("random", "correlated", "rank-deficient")


def random_jacobian(t: int, d: int, spread: float, kind: str, scale: float = 1.0, seed: int = 0) -> Tensor:
    """(t, d) float32 gradients whose norms span ``spread`` (log-spaced, shuffled) times a global ``scale``.

    ``random``: independent Gaussian directions. ``correlated``: a shared component (cosines around 0.7).
    ``rank-deficient``: rows in a random subspace of dimension ceil(t / 2).
    """
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        g = torch.randn(t, d, generator=gen, dtype=torch.float64)
    elif kind == "correlated":
        g = torch.randn(t, d, generator=gen, dtype=torch.float64) + 1.5 * torch.randn(
            1, d, generator=gen, dtype=torch.float64
        )
    elif kind == "rank-deficient":
        r = (t + 1) // 2
        g = torch.randn(t, r, generator=gen, dtype=torch.float64) @ torch.randn(
            r, d, generator=gen, dtype=torch.float64
        )
    else:
        raise ValueError(kind)
    norms = spread ** torch.linspace(0, 1, t, dtype=torch.float64)
    norms = norms[torch.randperm(t, generator=gen)]
    return (g / g.norm(dim=1, keepdim=True) * norms.unsqueeze(1) * scale).float()


def cosine(a: Tensor, b: Tensor) -> float:
    a, b = a.double(), b.double()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-300))


def agreement(d: Tensor, reference: Tensor, largest: float) -> float:
    """Cosine of d with the reference; for a reference shorter than 1e-3 of the largest gradient (no direction to
    speak of at float32 precision, e.g. the origin in MGDA's hull): 1 if |d - reference| <= 1e-5 * largest, else -1."""
    if float(reference.norm()) < 1e-3 * largest:
        return 1.0 if float((d.double() - reference).norm()) <= 1e-5 * largest else -1.0
    return cosine(d, reference)


def simplex_projection(v: Tensor) -> Tensor:
    """The closest point of the probability simplex to ``v`` (float64), by brute force: on each support S the
    closest point of the affine hull is ``v_S - (sum v_S - 1) / |S|``; the nearest candidate that is >= 0 wins."""
    v = v.double()
    best, best_x = math.inf, None
    for idx in _supports(v.numel()):  # (n, k): every support of size k
        on = v[idx]
        x = torch.zeros(idx.shape[0], v.numel(), dtype=v.dtype).scatter(
            1, idx, on - (on.sum(1, keepdim=True) - 1) / idx.shape[1]
        )
        gap = torch.where((x >= -1e-12).all(1), (x - v).norm(dim=1), math.inf)
        i = int(gap.argmin())
        if float(gap[i]) < best:
            best, best_x = float(gap[i]), x[i].clamp_min(0.0)
    return best_x


def modo_steps(batches: Sequence[Tensor], gamma: float, rho: float) -> List[Tuple[Tensor, Tensor]]:
    """MoDo (Chen et al., NeurIPS 2023, Alg. 1) step by step in float64, from ``lambda = 1/T``: for each step's three
    batches' gradients (3, T, D), ``lambda <- Pi(lambda - gamma (G_1 (G_2^T lambda) + rho lambda))``, then
    ``d = G_3^T lambda``. Returns ``(lambda, d)`` after each step."""
    out = []
    lam = None
    for grads in batches:
        g1, g2, g3 = grads.double()
        t = g1.shape[0]
        lam = torch.full((t,), 1.0 / t, dtype=torch.float64) if lam is None else lam
        toward = sum(lam[j] * g2[j] for j in range(t))  # G_2^T lambda, a vector of the parameters' space
        step = torch.stack([g1[i] @ toward + rho * lam[i] for i in range(t)])
        lam = simplex_projection(lam - gamma * step)
        out.append((lam, sum(lam[i] * g3[i] for i in range(t))))
    return out


def sdmgrad_steps(
    batches: Sequence[Tensor], lamda: float, niter: int, lr: float, momentum: float
) -> List[Tuple[Tensor, Tensor]]:
    """SDMGrad (Xiao et al., NeurIPS 2023, Alg. 1, with LibMTL's scaling and heavy-ball steps) step by step in float64,
    from ``w = 1/T``: for each step's three batches' gradients (3, T, D), ``niter`` times
    ``v <- momentum v + G_1 (G_2^T w + lamda g_0(2)) / s^2`` (v from 0; ``s`` the mean of
    ``sqrt(max(g_1t . g_2t, 0))``) and ``w <- Pi(w - lr v)``; then ``c = (w + lamda / T) / (1 + lamda)`` and
    ``d = G_3^T c``. Returns ``(c, d)`` after each step."""
    out = []
    w = None
    for grads in batches:
        g1, g2, g3 = grads.double()
        t = g1.shape[0]
        w = torch.full((t,), 1.0 / t, dtype=torch.float64) if w is None else w
        s = sum(math.sqrt(max(float(g1[i] @ g2[i]), 0.0)) for i in range(t)) / t
        s2 = s * s if s > 0 else 1.0
        mean2 = g2.sum(0) / t
        v = torch.zeros(t, dtype=torch.float64)
        for _ in range(niter):
            u = sum(w[j] * g2[j] for j in range(t)) + lamda * mean2  # G_2^T w + lamda g_0(2)
            v = momentum * v + torch.stack([g1[i] @ u for i in range(t)]) / s2
            w = simplex_projection(w - lr * v)
        c = (w + lamda / t) / (1 + lamda)
        out.append((c, sum(c[i] * g3[i] for i in range(t))))
    return out


def direction_oriented_weights(grads: Tensor, lamda: float) -> Tensor:
    """SDMGrad's subproblem ``argmin_{w in simplex} |G^T w + lamda g_0|^2 / 2`` (g_0 the mean gradient), float64,
    by brute force over supports: on S, ``[[M_SS, 1], [1^T, 0]] [w_S; mu] = [-lamda (M 1 / T)_S; 1]``; the feasible
    candidate with the least objective wins (a convex problem: the KKT point of its support is the minimum)."""
    m = gram64(grads)
    t = m.shape[0]
    b = lamda * m.mean(1)
    best, best_w = math.inf, None
    for idx in _supports(t):
        n, k = idx.shape
        rhs = torch.zeros(n, k + 1, 1, dtype=m.dtype)
        rhs[:, :k, 0] = -b[idx]
        rhs[:, k] = 1.0
        sol = torch.linalg.lstsq(_bordered(m, idx), rhs).solution
        for row in range(n):
            w = torch.zeros(t, dtype=m.dtype).index_put_((idx[row],), sol[row, :k, 0])
            if bool((w >= -1e-12).all()):
                value = float(w @ m @ w / 2 + w @ b)
                if value < best:
                    best, best_w = value, w.clamp_min(0.0)
    return best_w
