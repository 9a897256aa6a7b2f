"""A small name -> builder registry, one per kind of part (encoders, heads, datasets, ...)."""

from __future__ import annotations

import difflib
from typing import Any, Callable, Dict, Iterator, TypeVar

from mtl.core.errors import UserError

T = TypeVar("T", bound=Callable[..., Any])


class Registry:
    """Maps names to callables; duplicate and unknown names are clear errors."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, Callable[..., Any]] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator: ``@ENCODERS.register("small_cnn")``; the name defaults to the function's."""

        def deco(fn: T) -> T:
            key = name or fn.__name__
            if key in self._entries:
                raise ValueError(f"{self.kind} {key!r} is already registered")
            self._entries[key] = fn
            return fn

        return deco

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise UserError(f"unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def build(self, name: str, **kwargs: Any) -> Any:
        return self.get(name)(**kwargs)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def names(self) -> list[str]:
        return sorted(self._entries)
