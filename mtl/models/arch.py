"""Multitask architectures that replace the one shared encoder (``model.arch``): the registry and their contract.

An architecture is the model's ``encoder``: ``forward(x)`` gives the representation (a dict of tensors) and
``split(representation)`` each task's features, ``{task: {stage name: map, ..., "out": (B, C)}}``, which the task
heads read exactly as they read an encoder's. It declares which of its parameters are shared (every task's loss
may depend on them: gradient methods balance their gradients) and which belong to one task (trained with the
weighted sum of the losses, like the heads). ``representation`` says what ``weighting.grad_on: representation``
differentiates for it, or is None when no tensor is shared by every task (then that setting is refused).
``hard`` and ``mtan`` are built in :func:`mtl.build.model.build_model` and need no class here; the built-in
architectures register themselves when ``mtl.models.architectures`` is imported.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.core.registry import Registry

ARCHS = Registry("architecture")


class Architecture(nn.Module):
    """Base of the registered architectures; subclasses set ``out_dim`` and implement the methods below.

    Built as ``cls(encoder, make_encoder, tasks, input_size, **options)``: ``encoder`` is the configured encoder
    (weights loaded, ``model.freeze`` applied), ``make_encoder()`` builds another one like it (the same weights
    source and freezing; a fresh random initialisation when there are no weights), ``input_size`` is (C, H, W).
    """

    representation: Optional[str] = None  # what grad_on=representation differentiates; None: refused
    # the size rules of the encoder it is built from (see mtl.models.encoders.check_input_size)
    name: str = ""
    min_input_size: int = 1
    fixed_input_size: Optional[tuple] = None

    def __init__(self, encoder: nn.Module, tasks: Sequence[str]) -> None:
        super().__init__()
        if not tasks:
            raise UserError(f"model.arch={self.arch} needs at least one task")
        self.tasks = list(tasks)
        self.name = getattr(encoder, "name", type(encoder).__name__)
        self.min_input_size = getattr(encoder, "min_input_size", 1)
        self.fixed_input_size = getattr(encoder, "fixed_input_size", None)
        self.feature_info: List[Dict[str, Any]] = list(getattr(encoder, "feature_info", None) or [])
        self.notes = tuple(getattr(encoder, "notes", ()))

    @property
    def arch(self) -> str:
        return type(self).arch_name

    arch_name = ""

    def split(self, representation: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:  # pragma: no cover
        raise NotImplementedError

    def task_modules(self) -> List[nn.Module]:
        """Modules whose parameters belong to single tasks (gates, task experts); the rest is shared."""
        return []

    def task_parameters(self) -> Iterator[nn.Parameter]:
        for module in self.task_modules():
            yield from module.parameters()

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        owned = {id(p) for p in self.task_parameters()}
        return (p for p in self.parameters() if id(p) not in owned)


def register_arch(name: str) -> Callable[[type], type]:
    """``@register_arch("mmoe")``: registers the class and records its name on it."""

    def deco(cls: type) -> type:
        cls.arch_name = name
        return ARCHS.register(name)(cls)

    return deco


def arch_names() -> List[str]:
    """Every ``model.arch`` value: the two built in and the registered ones."""
    return ["hard", "mtan", *ARCHS.names()]
