"""An on-disk cache for generated tensors, keyed by everything that determines them."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from tqdm import tqdm

ANNOUNCE_AFTER_S = 2.0  # a generation that lasts this long says so


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
    started, said = time.perf_counter(), threading.Lock()

    def say() -> None:
        if said.acquire(blocking=False):
            tqdm.write(f"generating {path.name} (once: later runs read it from {path.parent})", file=sys.stderr)

    announce = threading.Timer(ANNOUNCE_AFTER_S, say)
    announce.daemon = True
    if ANNOUNCE_AFTER_S <= 0:
        say()  # at once, not from the timer's thread
    announce.start()
    try:
        tensors = build()
    finally:
        announce.cancel()
    if not said.acquire(blocking=False):  # the first line was printed: say that the wait is over
        tqdm.write(f"generated {path.name} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"key": _key_text(key), "tensors": tensors}, f)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as err:
        warnings.warn(f"could not write cache {path} ({err}); the data will be generated again next time", stacklevel=2)
    return tensors


def _key_text(key: dict[str, Any]) -> str:
    return json.dumps(key, sort_keys=True)
