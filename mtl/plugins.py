"""Your own parts, registered from your own module and named in configs, without editing ``mtl``.

    # my_project/parts.py
    from mtl.plugins import ENCODERS, HEADS, HOOKS, LOSSES, METRICS, WEIGHTINGS, Hook

    @LOSSES.register("focal")
    def focal(pred, target): ...

    @HOOKS.register("my_hook")       # named in the config's train.hooks
    class MyHook(Hook): ...

    mtl train cfg.yaml --import my_project.parts      # or, in the config: imports: [my_project.parts]

See docs/extending.md for one example of each kind and the contracts they follow.
"""

from __future__ import annotations

from mtl.core.imports import import_modules
from mtl.data.registry import DATASETS
from mtl.engine.hooks import HOOKS
from mtl.engine.trainer import Hook
from mtl.models.encoders import ENCODERS
from mtl.models.heads import HEADS
from mtl.tasks.base import LOSSES, METRICS, TASK_TYPES
from mtl.weighting.base import WEIGHTINGS

__all__ = [
    "DATASETS",
    "ENCODERS",
    "HEADS",
    "HOOKS",
    "LOSSES",
    "METRICS",
    "TASK_TYPES",
    "WEIGHTINGS",
    "Hook",
    "import_modules",
]
