"""The data set registry and the split names every builder accepts."""

from __future__ import annotations

from typing import Iterable, Mapping

from mtl.core.errors import UserError
from mtl.core.registry import Registry

DATASETS = Registry("dataset")


def resolve_split(dataset: str, split: str, known: Iterable[str], aliases: Mapping[str, str] | None = None) -> str:
    """Map ``split`` onto one of ``known`` (via ``aliases``, e.g. val -> test) or raise a UserError."""
    aliases = dict(aliases or {})
    split = aliases.get(split, split)
    known = list(known)
    if split not in known:
        names = known + [a for a in aliases if aliases[a] in known]
        raise UserError(f"data set {dataset!r} has no split {split!r}; use one of: {', '.join(names)}")
    return split
