"""Configs: typed schema (``schema``), loading with ``_base_``, overrides and validation (``load``)."""

from mtl.config.load import (
    Sources,
    build_config,
    config_to_dict,
    deep_merge,
    dump_config,
    load_config,
    load_yaml,
    parse_override,
    record_sources,
    yaml_problem,
)
from mtl.config.schema import Config

__all__ = [
    "Config",
    "Sources",
    "build_config",
    "config_to_dict",
    "deep_merge",
    "dump_config",
    "load_config",
    "load_yaml",
    "parse_override",
    "record_sources",
    "yaml_problem",
]
