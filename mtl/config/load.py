"""Load, merge, override, validate and dump experiment configs.

A config is a YAML file (read like ``yaml.safe_load``, except that floats such as ``1e-3`` are numbers, as in
YAML 1.2, and a key given twice in one mapping is an error) that may inherit from others through
``_base_: path`` or ``_base_: [paths]`` (relative to the file), deep-merged in order with the file's
own keys last. File paths in ``imports`` are relative to the file that lists them too (made absolute on loading,
so that a config written into a run directory finds them from anywhere). ``key.sub=value`` overrides from the
command line are parsed as YAML values. The result is validated against the dataclasses in :mod:`mtl.schema`:
unknown keys, wrong types and missing values are :class:`UserError` naming the key, the file that set it and the
closest known keys.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import yaml

from mtl.config.schema import Config, DataCfg
from mtl.core.errors import UserError
from mtl.core.imports import resolve_imports

Sources = Dict[Tuple[str, ...], str]  # key path -> the file (or "command line") that set it

_MISSING = dataclasses.MISSING
_OVERRIDES = "command-line overrides"


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot or exponent sign (``1e-3``, ``5E4``)."""


# YAML 1.1 (PyYAML) needs "1.0e-3"; the YAML 1.2 form below is how learning rates are usually written.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str, prefix: Sequence[str] = ()) -> Any:
    """``yaml.safe_load(text)`` with 1e-3 read as a float; a key given twice in a mapping is a ``yaml.YAMLError``
    that names it (as a dotted path below ``prefix``) and both of its lines."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(loader, node, tuple(prefix))
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(loader: yaml.SafeLoader, root: yaml.Node, prefix: Tuple[str, ...]) -> None:
    seen_nodes: set = set()  # aliases repeat nodes (and may form cycles): each is checked once
    stack: List[Tuple[yaml.Node, Tuple[str, ...]]] = [(root, prefix)]
    while stack:
        node, path = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack += [(child, path + (str(i),)) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first: Dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: later keys override merged ones
                    stack.append((value_node, path))
                    continue
                key, earlier = "?", key_node
                if isinstance(key_node, yaml.ScalarNode):  # keys that are lists or mappings: left to construction
                    key = loader.construct_object(key_node, deep=True)
                    earlier = first.setdefault(key, key_node)
                if earlier is not key_node:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {'.'.join(path + (str(key),))!r} is given twice (also on line "
                        f"{earlier.start_mark.line + 1}), and YAML would silently keep only the later value; keep one",
                        key_node.start_mark,
                    )
                stack.append((value_node, path + (str(key),)))


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Tuple[Dict[str, Any], Sources]:
    """Read a config file with its bases and overrides applied; returns the raw dict and key sources."""
    raw, sources = _load_file(Path(path), chain=())
    for item in overrides:  # in order: a later override of the same key wins, as options on a command line do
        keys, value = parse_override(item)
        if keys == ["imports"]:  # files named on the command line are relative to the current folder
            value = resolve_imports(value, Path.cwd())
        _set_path(raw, keys, value)
        for i in range(1, len(keys)):  # parents the override creates are the command line's too
            sources.setdefault(tuple(keys[:i]), _OVERRIDES)
        record_sources(sources, keys, value, _OVERRIDES)
    return raw, sources


def parse_override(item: str) -> Tuple[List[str], Any]:
    """``optim.lr=0.01`` -> (["optim", "lr"], 0.01); values are YAML (numbers, bools, lists, null)."""
    key, sep, text = item.partition("=")
    keys = key.strip().split(".")
    if not sep or not all(k.strip() for k in keys):
        raise UserError(f"bad override {item!r}: write key.sub=value, e.g. optim.lr=0.01 or model.freeze=all")
    keys = [k.strip() for k in keys]
    try:
        value = load_yaml(text, keys) if text.strip() else None
    except yaml.YAMLError as e:
        raise UserError(f"bad override {item!r}: the value is not valid YAML ({yaml_problem(e)})") from None
    except RecursionError:
        raise UserError(f"bad override {item!r}: the value is nested too deeply") from None
    _check_shape(value, f"override {item!r}")
    return keys, value


def _load_file(path: Path, chain: Tuple[Path, ...]) -> Tuple[Dict[str, Any], Sources]:
    path = path.expanduser()
    where = f" (a _base_ of {chain[-1]})" if chain else ""
    if path.resolve() in chain:
        raise UserError(f"config {path} inherits from itself through _base_")
    try:
        text = path.read_text()
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"config file not found: {path}{where}") from None
    except IsADirectoryError:
        inside = path / "config.yaml"
        hint = f"; did you mean {inside}?" if os.path.isfile(inside) else "; give a YAML file"
        raise UserError(f"config {path}{where} is a directory, not a config file{hint}") from None
    except PermissionError:
        raise UserError(
            f"cannot read config {path}{where}: permission denied; make it (and its folders) readable "
            f"or copy it somewhere readable"
        ) from None
    except OSError as e:
        raise UserError(f"cannot read config {path}{where}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise UserError(f"cannot parse config {path}{where}: it is not a text (UTF-8) file") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as e:
        raise UserError(f"cannot parse config {path}{where}: {yaml_problem(e)}; fix the YAML there") from None
    except RecursionError:
        raise UserError(f"cannot parse config {path}{where}: it is nested too deeply") from None
    _check_shape(data, f"config {path}{where}")
    if data is None:
        raise UserError(
            f"config {path}{where} is empty (no settings in it); write the settings there, "
            f"e.g. starting from a copy of configs/quickstart.yaml"
        )
    if not isinstance(data, dict):
        raise UserError(f"config {path} must be a mapping of keys to values, not a {type(data).__name__}")
    bases = data.pop("_base_", None) or []
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise UserError(f"_base_ in {path} must be a path or a list of paths")
    if "imports" in data:
        data["imports"] = resolve_imports(data["imports"], path.parent, str(path))
    merged: Dict[str, Any] = {}
    sources: Sources = {}
    for base in bases:
        base_raw, base_sources = _load_file(path.parent / base, chain + (path.resolve(),))
        merged = deep_merge(merged, base_raw)
        sources.update(base_sources)
    merged = deep_merge(merged, data)
    record_sources(sources, [], data, str(path))
    return merged, sources


def deep_merge(base: Mapping[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """Recursively merge ``update`` into a copy of ``base``: mappings merge, everything else replaces. A mapping of
    ``update`` with ``_delete_: true`` replaces the base's mapping instead of merging into it (mmengine's rule), e.g.
    ``head: {_delete_: true, name: linear}`` keeps none of a base head's options."""
    out = copy.deepcopy(dict(base))
    for key, value in update.items():
        if not isinstance(value, Mapping):
            out[key] = copy.deepcopy(value)
            continue
        replace = value.get("_delete_", False)
        if not isinstance(replace, bool):
            raise UserError(f"_delete_ under {key} must be true (replace the base's {key}) or false, got {replace!r}")
        value = {k: v for k, v in value.items() if k != "_delete_"}
        merge = not replace and isinstance(out.get(key), Mapping)
        out[key] = deep_merge(out[key] if merge else {}, value)
    return out


def record_sources(sources: Sources, prefix: List[str], value: Any, source: str) -> None:
    sources[tuple(prefix)] = source
    if isinstance(value, Mapping):
        for k, v in value.items():
            record_sources(sources, prefix + [str(k)], v, source)


def _set_path(raw: Dict[str, Any], keys: List[str], value: Any) -> None:
    node = raw
    for k in keys[:-1]:
        if not isinstance(node.get(k), dict):
            node[k] = {}
        node = node[k]
    node[keys[-1]] = value


_MAX_VALUES = 100_000  # a config with more values than this once YAML aliases are expanded is a mistake (or an attack)


def _check_shape(data: Any, what: str) -> None:
    """Refuse what YAML aliases allow but no config needs: a value that contains itself, or one that expands
    (``&a [...]`` used many times inside ``&b``, ...) into a tree too big to merge, validate or dump."""
    sizes: Dict[int, int] = {}  # id -> values below it, counting every use of an alias
    open_: set = set()  # ids of the containers being walked

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_:
            raise UserError(
                f"{what} contains itself through a YAML alias (a *name inside its own &name); remove that alias"
            )
        open_.add(key)
        total = 1 + sum(size(child) for child in (node.values() if isinstance(node, dict) else node))
        open_.discard(key)
        if total > _MAX_VALUES:
            raise UserError(
                f"{what} expands to more than {_MAX_VALUES:,} values through its YAML aliases; "
                f"write the values out instead"
            )
        sizes[key] = total
        return total

    try:
        size(data)
    except RecursionError:
        raise UserError(f"{what} is nested too deeply") from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """``line 2, column 5: expected ',' or ']', but got ':' (while parsing a flow sequence from line 1, column 4)``."""
    mark, problem = getattr(e, "problem_mark", None), getattr(e, "problem", None)
    if mark is None or not problem:
        return " ".join(str(e).split())
    text = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, context_mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context:
        text += (
            f" ({context}"
            + (
                f" from line {context_mark.line + 1}, column {context_mark.column + 1}"
                if context_mark is not None and context_mark.line != mark.line
                else ""
            )
            + ")"
        )
    return " ".join(text.split())


# --------------------------------------------------------------------------- validation


def build_config(raw: Mapping[str, Any], sources: Sources | None = None) -> Config:
    """Validate a raw dict against :class:`mtl.schema.Config` and return the typed config."""
    if not isinstance(raw, Mapping):
        raise UserError(f"a config must be a mapping of keys to values, not a {type(raw).__name__}")
    _check_shape(raw, "the config")
    cfg = _convert(Config, raw, (), sources or {})
    task_configs(cfg, sources)  # a multi-input config's task data, validated like the top-level data
    return cfg


_DATA_SET_KEYS = ("root", "options", "classes")  # settings of one data set: not passed on to a task on another set


def task_configs(cfg: Config, sources: Sources | None = None) -> Dict[str, Config]:
    """A multi-input config (``tasks.<t>.data``) as one single-input config per task: that task alone, with its data
    resolved: the top-level ``data`` with the task's keys over it (``options`` merged key by key); a task that names
    another data set than the top level's inherits none of its root, options and classes. Empty for other configs.
    Errors name the key as ``tasks.<t>.data.<key>``."""
    if not cfg.multi_input:
        return {}
    top = dataclasses.asdict(cfg.data)
    out = {}
    for name, task in cfg.tasks.items():
        base = top
        if task.data.get("name", cfg.data.name) != cfg.data.name:
            base = {k: v for k, v in top.items() if k not in _DATA_SET_KEYS}
        one = copy.deepcopy(cfg)
        one.data = _convert(DataCfg, deep_merge(base, task.data), ("tasks", name, "data"), sources or {})
        one.tasks = {name: dataclasses.replace(one.tasks[name], data=None)}
        out[name] = one
    return out


def config_to_dict(cfg: Any) -> Dict[str, Any]:
    """The fully resolved config as plain data, ready for ``yaml.safe_dump``; deprecated keys (field metadata
    ``deprecated``) that are not set are left out."""
    data = dataclasses.asdict(cfg)
    _drop_unset_deprecated(cfg, data)
    return data


def _drop_unset_deprecated(obj: Any, data: Dict[str, Any]) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("deprecated") and value is None:
            data.pop(f.name, None)
        elif dataclasses.is_dataclass(value) and isinstance(data.get(f.name), dict):
            _drop_unset_deprecated(value, data[f.name])


def dump_config(cfg: Any, path: str | Path) -> None:
    """Write the fully resolved config so that ``mtl train <path>`` reproduces the run."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def _where(path: Tuple[str, ...], sources: Sources) -> str:
    for i in range(len(path), -1, -1):
        if path[:i] in sources:
            return f" (set in {sources[path[:i]]})"
    return ""


def _name(path: Tuple[str, ...]) -> str:
    return ".".join(path) or "<top level>"


def _convert(tp: Any, value: Any, path: Tuple[str, ...], sources: Sources) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin is typing.Union:
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, path, sources)
            except UserError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        raise _type_error(path, value, " or ".join(_type_name(a) for a in args), sources)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str) and "name" in {f.name for f in dataclasses.fields(tp)}:
            value = {"name": value}  # shorthand: ``head: mlp`` means ``head: {name: mlp}``
        if not isinstance(value, Mapping):
            raise _type_error(path, value, "a mapping", sources)
        return _convert_dataclass(tp, value, path, sources)
    if origin in (list, List):
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise _type_error(path, value, "a list", sources)
        return [_convert(args[0] if args else Any, v, path + (str(i),), sources) for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, Mapping):
            raise _type_error(path, value, "a mapping", sources)
        vt = args[1] if args else Any
        return {str(k): _convert(vt, v, path + (str(k),), sources) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise _type_error(path, value, "true or false", sources)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _type_error(path, value, "an integer", sources)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _type_error(path, value, "a number", sources)
        if not math.isfinite(value):
            raise _type_error(path, value, "a finite number", sources)
        return float(value)
    if tp is str:
        if isinstance(value, bool):  # YAML 1.1 reads on/off/yes/no as booleans: `amp: off` means "off"
            return "on" if value else "off"
        if not isinstance(value, str):
            raise _type_error(path, value, "a string", sources)
        return value
    raise TypeError(f"unsupported schema type {tp!r} at {_name(path)}")


def _convert_dataclass(cls: Any, value: Mapping[str, Any], path: Tuple[str, ...], sources: Sources) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in value:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(fields)}"
            raise UserError(
                f"unknown config key {_name(path + (str(key),))!r}{_where(path + (str(key),), sources)}{hint}"
            )
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = _convert(hints[name], value[name], path + (name,), sources)
            _check_bounds(kwargs[name], f.metadata, path + (name,), sources)
        elif f.default is _MISSING and f.default_factory is _MISSING:
            raise UserError(f"missing required config value {_name(path + (name,))!r}{_where(path, sources)}")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if check is not None:
        problem = check()
        if problem:
            named = problem.split(" ", 1)[0].rstrip(":").rsplit(".", 1)[-1]  # "train.device must be ...": the key
            where = _where(path + (named,) if named in fields else path, sources)
            raise UserError(f"bad config value in {_name(path) if path else 'config'}{where}: {problem}")
    return obj


def _check_bounds(value: Any, metadata: Mapping[str, Any], path: Tuple[str, ...], sources: Sources) -> None:
    """The limits a ``schema.bounded`` field declares, on its number or on each number of its list or mapping."""
    limits = metadata.get("bounds")
    if not limits or value is None:
        return
    items = (
        value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else [(None, value)]
    )
    tests = {">=": lambda v, b: v >= b, ">": lambda v, b: v > b, "<=": lambda v, b: v <= b, "<": lambda v, b: v < b}
    for key, v in items:
        if not all(tests[op](v, bound) for op, bound in limits.items()):
            where = path + (str(key),) if key is not None else path
            need = " and ".join(
                f"{op} {bound:g}" if isinstance(bound, float) else f"{op} {bound}" for op, bound in limits.items()
            )
            note = f" ({metadata['note']})" if metadata.get("note") else ""
            raise UserError(f"config key {_name(where)!r}{_where(where, sources)} must be {need}{note}, got {v!r}")


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _type_error(path: Tuple[str, ...], value: Any, expected: str, sources: Sources) -> UserError:
    return UserError(
        f"config key {_name(path)!r}{_where(path, sources)} must be {expected}, got {value!r} ({type(value).__name__})"
    )
