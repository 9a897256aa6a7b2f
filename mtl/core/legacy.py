"""Module paths of mtl before its layered layout (``mtl.trainer``, ``mtl.heads``, ...), kept importable so that
plugins and scripts written for them keep working.

``import mtl.trainer`` gives a module whose attributes are looked up, on first use, in the modules that now hold
those names (``mtl.engine.trainer``, ``mtl.engine.hooks``, ...). The objects are the same: ``mtl.trainer.Hook is
mtl.engine.hooks.Hook``. New code imports from the new paths.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
from typing import Any, Dict, Optional, Sequence, Tuple

# old module -> the modules that now hold its names, searched in order
MOVED: Dict[str, Tuple[str, ...]] = {
    "mtl.errors": ("mtl.core.errors",),
    "mtl.registry": ("mtl.core.registry",),
    "mtl.distributed": ("mtl.core.distributed",),
    "mtl.checkpoint": ("mtl.core.checkpoint",),
    "mtl.rundir": ("mtl.core.rundir",),
    "mtl.schema": ("mtl.config.schema",),
    "mtl.encoders": ("mtl.models.encoders",),
    "mtl.weights": ("mtl.models.weights",),
    "mtl.heads": ("mtl.models.heads",),
    "mtl.mtan": ("mtl.models.mtan",),
    "mtl.freezing": ("mtl.models.freezing",),
    "mtl.progressive": ("mtl.models.progressive",),
    "mtl.model": ("mtl.models.transfer",),
    "mtl.trainer": ("mtl.engine.trainer", "mtl.core.runtime", "mtl.engine.monitor", "mtl.engine.meter"),
    "mtl.hooks": ("mtl.engine.hooks",),
    "mtl.evaluate": ("mtl.engine.evaluate", "mtl.workflows.evaluate"),
    "mtl.optim": ("mtl.engine.optim",),
    "mtl.features": ("mtl.engine.feature_cache",),
    "mtl.visualize": ("mtl.engine.visualize", "mtl.tasks.drawing"),
    "mtl.compare": ("mtl.workflows.compare", "mtl.engine.monitor"),
    "mtl.experiment": (
        "mtl.workflows.train",
        "mtl.workflows.stages",
        "mtl.build.experiment",
        "mtl.build.data",
        "mtl.build.tasks",
        "mtl.build.model",
        "mtl.core.runtime",
        "mtl.core.imports",
        "mtl.data.loaders",
        "mtl.config.stages",
    ),
    "mtl.continual": ("mtl.workflows.continual", "mtl.workflows.learners"),
    "mtl.runs": ("mtl.workflows.runs", "mtl.build.tasks", "mtl.build.data", "mtl.build.model"),
    "mtl.predict": ("mtl.workflows.predict",),
    "mtl.inspection": ("mtl.workflows.inspect", "mtl.core.runtime"),
}


class _Moved(types.ModuleType):
    """A module that finds each attribute in the modules that hold it now."""

    def __init__(self, name: str, homes: Sequence[str]) -> None:
        super().__init__(name, f"moved: {name} is now {', '.join(homes)}")
        self.__homes = tuple(homes)

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        for home in self.__homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} (now {', '.join(self.__homes)}) has no attribute {attr!r}")

    def __dir__(self) -> list:
        return sorted({n for home in self.__homes for n in dir(importlib.import_module(home))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if name not in MOVED:
            return None
        return importlib.machinery.ModuleSpec(name, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        return _Moved(spec.name, MOVED[spec.name])

    def exec_module(self, module: types.ModuleType) -> None:
        pass


def install() -> None:
    """Make the old module paths importable (idempotent)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
