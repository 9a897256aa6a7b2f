"""Staged configs: one validated config per stage of a config's ``stages`` list."""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from mtl.config.load import Sources, build_config, deep_merge, record_sources
from mtl.config.schema import Config
from mtl.core.errors import UserError


def stage_configs(raw: Dict[str, Any], sources: Sources) -> List[Config]:
    """One validated config per stage (stage patches deep-merged onto the top-level config)."""
    base = {k: v for k, v in raw.items() if k != "stages"}
    configs = []
    for i, stage in enumerate(raw.get("stages") or []):
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise UserError(f"stages[{i}] must be a mapping with a name, e.g. {{name: pretrain, train: {{epochs: 5}}}}")
        patch = dict(stage)  # its name too: checked as a folder name, like the run's
        stage_sources = dict(sources)
        record_sources(stage_sources, [], patch, f"{sources.get(('stages',), 'the config')}, stage {stage['name']!r}")
        configs.append(build_config(deep_merge(base, patch), stage_sources))
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise UserError(f"stage names must be unique, got {', '.join(names)}")
    for cfg in configs:
        w = cfg.model.weights or ""
        if w.startswith("stage:") and w[6:] not in names[: names.index(cfg.name)]:
            raise UserError(
                f"stage {cfg.name!r}: weights {w!r} names no earlier stage; "
                f"earlier: {', '.join(names[: names.index(cfg.name)]) or 'none'}"
            )
    return configs


def select_stage(stages: List[Config], name: Optional[str]) -> Config:
    """The config of stage ``name`` among ``stages`` (a staged config's, from ``stage_configs``), the last one when
    ``name`` is None; an unknown name is one line that lists the stages (``--stage NAME`` of mtl summary, lr-find)."""
    names = [c.name for c in stages]
    if not stages:
        raise UserError("--stage picks a stage of a config with stages; this config has none")
    if name is None:
        return stages[-1]
    if name not in names:
        raise UserError(f"--stage {name}: no such stage; the stages are {', '.join(names)}")
    return stages[names.index(name)]
