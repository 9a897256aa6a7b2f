"""Your own parts, registered from your own module and named in configs, without editing ``mtl``.

    # my_project/parts.py
    from mtl.plugins import ENCODERS, HEADS, LOSSES, METRICS, WEIGHTINGS

    @LOSSES.register("focal")
    def focal(pred, target): ...

    mtl train cfg.yaml --import my_project.parts      # or, in the config: imports: [my_project.parts]

See docs/extending.md for one example of each kind and the contracts they follow.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Iterable

from mtl.data.registry import DATASETS
from mtl.models.encoders import ENCODERS
from mtl.core.errors import UserError
from mtl.models.heads import HEADS
from mtl.tasks.base import LOSSES, METRICS, TASK_TYPES
from mtl.weighting.base import WEIGHTINGS

__all__ = ["DATASETS", "ENCODERS", "HEADS", "LOSSES", "METRICS", "TASK_TYPES", "WEIGHTINGS", "import_modules"]

_imported: set = set()


def import_modules(names: Iterable[str]) -> None:
    """Import each module (a dotted name found from the current folder or sys.path, or a ``.py`` file) once."""
    cwd = os.getcwd()
    if cwd not in sys.path:  # `mtl` is a console script: make the user's own package importable as with python -m
        sys.path.insert(0, cwd)
    for name in names:
        if name in _imported:
            continue
        try:
            if name.endswith(".py"):
                path = Path(name).expanduser().resolve()
                if not path.is_file():
                    raise UserError(f"plugin file {name} does not exist")
                spec = importlib.util.spec_from_file_location(f"mtl_plugin_{path.stem}", path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[spec.name] = module
                spec.loader.exec_module(module)
            else:
                importlib.import_module(name)
        except UserError:
            raise
        except ModuleNotFoundError as e:
            raise UserError(f"cannot import plugin module {name!r} ({e}); check the name, run mtl from the folder "
                            f"that holds it, or add that folder to PYTHONPATH") from None
        except ValueError as e:  # e.g. registering a name twice
            raise UserError(f"plugin module {name!r}: {e}") from None
        _imported.add(name)
