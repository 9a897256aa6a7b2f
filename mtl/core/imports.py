"""Importing the user's own modules (plugins) by name or file."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable

from mtl.core.errors import UserError

_imported: set = set()


def is_path_entry(name: str) -> bool:
    """Whether an ``imports`` entry names a file (it ends with ``.py`` or holds a path separator), not a module."""
    return name.endswith(".py") or "/" in name or os.sep in name


def resolve_imports(names: Any, folder: str | Path, config: str = "") -> Any:
    """``imports`` entries with every file path made absolute against ``folder`` (the folder of the config ``config``
    that lists them, or the current folder for the command line); module names are left as they are, and so is a
    value that is no list of strings (refused later, by ``import_config_modules``). A relative path that exists only
    from the current folder, where mtl looked before, is taken from there with a warning."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return names
    out = []
    for name in names:
        if not is_path_entry(name):
            out.append(name)
            continue
        given = Path(name).expanduser()
        path = Path(folder).expanduser().absolute() / given
        old = Path.cwd() / given
        if not given.is_absolute() and not path.exists() and old.is_file():
            warnings.warn(
                f"imports: {name}{f' (in {config})' if config else ''} is read from the config file's folder, "
                f"{path.parent}, where it does not exist; using {old} from the current folder, as mtl did before. "
                f"Write the path relative to the config file"
            )
            path = old
        out.append(os.path.normpath(path))
    return out


def import_modules(names: Iterable[str]) -> None:
    """Import each module (a dotted name found from the current folder or sys.path, or a ``.py`` file, relative to
    the current folder) once; a file named twice, by different paths, is imported once."""
    cwd = os.getcwd()
    if cwd not in sys.path:  # `mtl` is a console script: make the user's own package importable as with python -m
        sys.path.insert(0, cwd)
    for name in names:
        key = str(Path(name).expanduser().resolve()) if is_path_entry(name) else name
        if key in _imported:
            continue
        try:
            if is_path_entry(name):
                path = Path(key)
                if not name.endswith(".py"):
                    raise UserError(
                        f"plugin {name}: a path in imports must name a .py file; import a package by its module name "
                        f"(my_pkg.parts) from the folder that holds it, or add that folder to PYTHONPATH"
                    )
                if not path.is_file():
                    raise UserError(
                        f"plugin file {name} does not exist (a relative path in a config's imports is read from the "
                        f"config file's folder, on the command line from the current folder)"
                    )
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
        _imported.add(key)


def import_config_modules(raw: Dict[str, Any]) -> None:
    """Import the config's ``imports`` before anything named in it is looked up."""
    names = raw.get("imports") or []
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"imports must be a list of module names or .py files, got {names!r}")
    if names:
        import_modules(names)
