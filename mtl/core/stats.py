"""Statistics over seeds: mean, sample standard deviation and the 95 % Student-t interval, with the t
distribution computed here (no scipy)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta function (modified Lentz; Press et al.,
    Numerical Recipes in C, 2nd ed., eqs. 6.4.5-6.4.6)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betai(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) (Numerical Recipes eq. 6.4.1 with its symmetry 6.4.3)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: int) -> float:
    """P(T <= t) for Student's t with ``df`` degrees of freedom: 1 - I_{df/(df+t^2)}(df/2, 1/2) / 2 for t >= 0
    (Numerical Recipes in C, 2nd ed., eq. 6.4.9, whose A(t|df) = P(|T| < t))."""
    tail = 0.5 * _betai(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (0.5 < p < 1), by bisection on ``t_cdf``."""
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo < 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


@dataclass
class Stat:
    """Values over seeds: mean, sample standard deviation (ddof 1) and the 95 % Student-t interval
    mean ± t_{0.975, n-1} s / sqrt(n); std and the interval are None for a single value."""

    values: List[float]
    mean: float
    std: Optional[float]
    ci_low: Optional[float]
    ci_high: Optional[float]

    @property
    def n(self) -> int:
        return len(self.values)

    def as_dict(self) -> Dict[str, Any]:
        keys = ("mean", "std", "ci_low", "ci_high", "n", "values")
        return {k: getattr(self, k) for k in keys}


def describe(values: Sequence[float]) -> Stat:
    """Mean, sample std and 95 % t-interval of ``values`` (at least one)."""
    values = [float(v) for v in values]
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return Stat(values, mean, None, None, None)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(0.975, n - 1) * std / math.sqrt(n)
    return Stat(values, mean, std, mean - half, mean + half)
