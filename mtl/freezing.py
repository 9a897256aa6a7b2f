"""What trains: freeze specs, frozen normalisation layers, unfreezing, L2-SP.

Names in freeze specs are relative to the encoder and follow torchvision's module names
(``layer4``, ``features.18``). A pattern matches a parameter when it equals the parameter's name,
is a dotted prefix of it (``layer4`` matches ``layer4.0.conv1.weight``), or matches it as a glob.
"""
from __future__ import annotations

import fnmatch
from typing import Any, Dict, Iterable, List, Sequence

import torch
from torch import Tensor, nn

from .errors import UserError

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm)


def matches(name: str, pattern: str) -> bool:
    """True if ``pattern`` is ``name``, a dotted prefix of it, or a glob matching it."""
    return name == pattern or name.startswith(pattern + ".") or fnmatch.fnmatchcase(name, pattern)


def _select(names: Sequence[str], patterns: Iterable[str], what: str) -> List[str]:
    chosen = []
    for pattern in patterns:
        hit = [n for n in names if matches(n, pattern)]
        if not hit:
            tops = sorted({n.split(".")[0] for n in names})
            raise UserError(f"{what} pattern {pattern!r} matches no encoder parameter; top-level modules: {', '.join(tops)}")
        chosen += hit
    return [n for n in names if n in set(chosen)]


def frozen_names(encoder: nn.Module, spec: Any) -> List[str]:
    """Encoder parameter names that ``spec`` freezes, in module order.

    ``spec``: ``"none"``, ``"all"``, a list of patterns to freeze, or one of the mappings
    ``{until: M}`` (M and everything before it), ``{from: M}`` (M and everything after it),
    ``{freeze: [patterns]}``, ``{train: [patterns]}`` (everything else is frozen).
    """
    names = [n for n, _ in encoder.named_parameters()]
    if spec in (None, "none", False):
        return []
    if spec in ("all", True):
        return names
    if isinstance(spec, list):
        return _select(names, spec, "model.freeze")
    if isinstance(spec, dict) and len(spec) == 1:
        (kind, value), = spec.items()
        if kind in ("until", "from") and isinstance(value, str):
            hit = [i for i, n in enumerate(names) if matches(n, value)]
            if not hit:
                _select(names, [value], f"model.freeze.{kind}")
            return names[: hit[-1] + 1] if kind == "until" else names[hit[0]:]
        if kind in ("freeze", "train") and isinstance(value, list):
            picked = _select(names, value, f"model.freeze.{kind}")
            return picked if kind == "freeze" else [n for n in names if n not in set(picked)]
    raise UserError(
        f"model.freeze: cannot read {spec!r}; use none, all, a list of module patterns, "
        "{until: layer3}, {from: layer3}, {freeze: [...]} or {train: [...]}"
    )


def apply_freeze(encoder: nn.Module, spec: Any) -> int:
    """Freeze the encoder parameters chosen by ``spec``; returns how many tensors were frozen."""
    frozen = set(frozen_names(encoder, spec))
    for name, p in encoder.named_parameters():
        p.requires_grad_(name not in frozen)
    return len(frozen)


def set_trainable(encoder: nn.Module, patterns: Sequence[str]) -> List[nn.Parameter]:
    """Unfreeze encoder parameters matching ``patterns``; returns those that were frozen before."""
    names = _select([n for n, _ in encoder.named_parameters()], patterns, "train.unfreeze")
    params = dict(encoder.named_parameters())
    newly = [params[n] for n in names if not params[n].requires_grad]
    for p in newly:
        p.requires_grad_(True)
    return newly


def freeze_norm_stats(model: nn.Module) -> None:
    """Put normalisation layers whose parameters are all frozen into eval mode (running stats stay)."""
    for m in model.modules():
        if isinstance(m, _NORMS):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()


class L2SP:
    """L2-SP (Li et al. 2018): ``alpha/2 * sum ||w - w0||^2`` over trained encoder weights, w0 = start."""

    def __init__(self, encoder: nn.Module, alpha: float) -> None:
        self.alpha = alpha
        self.encoder = encoder
        self.start: Dict[str, Tensor] = {n: p.detach().clone() for n, p in encoder.named_parameters()}

    def penalty(self) -> Tensor:
        terms = [(p - self.start[n]).pow(2).sum() for n, p in self.encoder.named_parameters() if p.requires_grad]
        if not terms:
            return torch.zeros((), device=next(iter(self.start.values())).device)
        return 0.5 * self.alpha * torch.stack(terms).sum()
