"""What trains: freeze specs, frozen modules in eval mode, unfreezing, L2-SP.

Names in freeze specs are relative to the encoder and follow torchvision's module names
(``layer4``, ``features.18``). A pattern matches a parameter when it equals the parameter's name,
is a dotted prefix of it (``layer4`` matches ``layer4.0.conv1.weight``), or matches it as a glob.
"""

from __future__ import annotations

import difflib
import fnmatch
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from mtl.core.errors import UserError

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
            modules = sorted({n.rsplit(".", i)[0] for n in names for i in range(1, n.count(".") + 1)})
            close = difflib.get_close_matches(str(pattern), modules, n=3)
            hint = f"did you mean {', '.join(close)}? " if close else ""
            raise UserError(
                f"{what} pattern {pattern!r} matches no encoder parameter; {hint}top-level modules: {', '.join(tops)}"
            )
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
        ((kind, value),) = spec.items()
        if kind in ("until", "from") and isinstance(value, str):
            hit = [i for i, n in enumerate(names) if matches(n, value)]
            if not hit:
                _select(names, [value], f"model.freeze.{kind}")
            return names[: hit[-1] + 1] if kind == "until" else names[hit[0] :]
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


def check_unfreeze(
    encoder: nn.Module,
    events: Sequence[Any],
    epochs: int,
    freeze: Any = None,
    per_epoch: Optional[int] = None,
    steps: Optional[int] = None,
) -> None:
    """Refuse ``train.unfreeze`` events (``epoch`` or ``step``, ``modules``) that would never happen or change nothing:
    an epoch outside 0..epochs-1, a step outside the run's training steps (``steps``, the step budget, else ``epochs``
    of ``per_epoch`` steps), a pattern that matches no encoder parameter, or one whose parameters all train already
    then (under ``model.freeze``, ``freeze``, as applied to ``encoder``; and after the events before it)."""
    names = [n for n, _ in encoder.named_parameters()]
    freed: Dict[str, Tuple[int, str]] = {n: (-1, "") for n, p in encoder.named_parameters() if p.requires_grad}
    for i in sorted(range(len(events)), key=lambda i: _unfreeze_order(events[i], per_epoch, i)):
        event, where = events[i], f"train.unfreeze[{i}]"
        when = f"epoch {event.epoch}" if getattr(event, "step", None) is None else f"step {event.step}"
        if event.epoch is not None and not 0 <= event.epoch < epochs:
            given = f"train.epochs is {epochs}" if steps is None else f"the run has {epochs} (train.steps {steps})"
            raise UserError(
                f"{where}: epoch {event.epoch} never starts: epochs count from 0 and {given}, so give an epoch from 0 "
                f"to {epochs - 1} (or raise train.{'epochs' if steps is None else 'steps'})"
            )
        if event.epoch is None:
            total = steps if steps is not None else epochs * (per_epoch or 0)
            if not 0 <= event.step < total:
                given = (
                    f"train.steps is {steps}"
                    if steps is not None
                    else f"the run has {total} ({epochs} epochs of {per_epoch})"
                )
                raise UserError(
                    f"{where}: step {event.step} never comes: training steps count from 0 and {given}, so give a step "
                    f"from 0 to {total - 1} (or raise train.{'steps' if steps is not None else 'epochs'})"
                )
        if not event.modules:
            raise UserError(f"{where}: modules is empty; name the encoder modules to unfreeze, e.g. [layer4]")
        hits = {}
        for pattern in event.modules:
            hit = _select(names, [pattern], f"{where}.modules")
            if all(n in freed for n in hit):
                j, then = freed[hit[0]]
                why = (
                    f"train.unfreeze[{j}] unfreezes it at {then}"
                    if j >= 0
                    else f"model.freeze {freeze!r} leaves it trainable"
                )
                raise UserError(
                    f"{where}: {pattern!r} already trains at {when} ({why}), so unfreezing "
                    f"it would change nothing; remove it, or freeze it with model.freeze"
                )
            hits.update({n: (i, when) for n in hit if n not in freed})
        freed.update(hits)


def _unfreeze_order(event: Any, per_epoch: Optional[int], i: int) -> Tuple[int, int, int]:
    """When ``event`` (number ``i``) happens among the unfreeze events: its step (an epoch's first, with ``per_epoch``
    steps an epoch), epoch events before step events at the same step, then in list order."""
    step = getattr(event, "step", None)
    if step is None:
        return (event.epoch * (per_epoch or 1), 0, i)
    if per_epoch is None:
        raise ValueError("check_unfreeze needs per_epoch to order step events among epoch events")
    return (step, 1, i)


def eval_frozen(model: nn.Module, encoder: nn.Module | None = None) -> None:
    """Eval mode for what is frozen, so that it computes in training what it computes in evaluation (no dropout,
    no stochastic depth, no change to normalisation statistics): every module of ``model`` that has parameters,
    all of them frozen; and the parameter-free modules of ``encoder`` registered before its first trainable
    parameter (the dropout or pooling of a frozen prefix)."""

    def visit(module: nn.Module) -> Tuple[bool, bool]:
        own = [p.requires_grad for p in module.parameters(recurse=False)]
        has, trains = bool(own), any(own)
        for child in module.children():
            child_has, child_trains = visit(child)
            has, trains = has or child_has, trains or child_trains
        if has and not trains:
            frozen.append(module)
        elif not has:
            empty.add(module)
        return has, trains

    frozen: List[nn.Module] = []
    empty: set = set()
    visit(model)
    for module in frozen:
        module.eval()
    if encoder is not None:
        for module in encoder.modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                break
            if module in empty:
                module.eval()


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
