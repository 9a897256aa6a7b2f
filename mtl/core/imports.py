"""Importing the user's own modules (plugins) by name or file."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable

from mtl.core.errors import UserError

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
            raise UserError(
                f"cannot import plugin module {name!r} ({e}); check the name, run mtl from the folder "
                f"that holds it, or add that folder to PYTHONPATH"
            ) from None
        except ValueError as e:  # e.g. registering a name twice
            raise UserError(f"plugin module {name!r}: {e}") from None
        _imported.add(name)


def import_config_modules(raw: Dict[str, Any]) -> None:
    """Import the config's ``imports`` before anything named in it is looked up."""
    names = raw.get("imports") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"imports must be a list of module names or .py files, got {names!r}")
    if names:
        import_modules(names)
