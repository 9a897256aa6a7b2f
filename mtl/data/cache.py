"""An on-disk cache for generated tensors, keyed by everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor

from mtl.core.checkpoint import give_plain_mode
from mtl.core.waiting import ANNOUNCE_AFTER_S, announced


def cache_path(root: str | os.PathLike, name: str, key: dict[str, Any]) -> Path:
    """``root/<name>-<split>-<hash of key>.pt``."""
    digest = hashlib.sha256(_key_text(key).encode()).hexdigest()[:16]
    return Path(root).expanduser() / f"{name}-{key.get('split', 'all')}-{digest}.pt"


def load_or_build(path: Path, key: dict[str, Any], build: Callable[[], dict[str, Tensor]]) -> dict[str, Tensor]:
    """Load the tensors cached at ``path`` for ``key``, or build them and write them there atomically."""
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == _key_text(key):
                return cached["tensors"]
        except Exception as err:  # a damaged cache is rebuilt, not fatal
            warnings.warn(f"ignoring unreadable cache {path} ({err}); rebuilding it", stacklevel=2)
    # a wait of seconds to minutes (rendering scenes or captchas): once it lasts ANNOUNCE_AFTER_S, one line says what
    # is happening (also in a log), and a second one when it is done; a quick build stays silent
    with announced(
        f"generating {path.name} (once: later runs read it from {path.parent})",
        lambda seconds: f"generated {path.name} in {seconds:.1f} s",
        ANNOUNCE_AFTER_S,
    ):
        tensors = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": _key_text(key), "tensors": tensors}, f)
            give_plain_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        warnings.warn(f"could not write cache {path} ({err}); the data will be generated again next time", stacklevel=2)
    return tensors


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)
