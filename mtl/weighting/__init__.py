"""Multitask weighting: how task losses or their gradients combine into one update (see base.py)."""

from mtl.weighting import gradient, loss  # noqa: F401  (importing registers the methods)
from mtl.weighting.base import (
    WEIGHTINGS,
    GradientWeighting,
    LossWeighting,
    Weighting,
    build_weighting,
)

__all__ = ["WEIGHTINGS", "GradientWeighting", "LossWeighting", "Weighting", "build_weighting"]
