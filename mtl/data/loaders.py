"""Loaders of the per-item path, and every loader's split in a fixed order."""

from __future__ import annotations

from typing import Any, Callable, Dict, List

from torch.utils.data import DataLoader, default_collate

from mtl.core.runtime import ignore_stop_signals, stop_signals_blocked
from mtl.data.batches import loader_batch_size


class SignalSafeLoader(DataLoader):
    """A DataLoader whose workers leave Ctrl-C and SIGTERM to the main process from the moment they are forked
    (``stop_signals_blocked`` around the fork, then ``ignore_stop_signals`` in each worker)."""

    def __iter__(self) -> Any:
        with stop_signals_blocked():
            return super().__iter__()


def collate_targets(targets: Dict[str, str]) -> Callable[[List[Dict[str, Any]]], Dict[str, Any]]:
    """A collate function: items ``{"image", key: ...}`` -> ``{"image", "targets": {task: batch[key]}}`` for
    ``targets`` {task: item key}."""

    def collate(items: List[Dict[str, Any]]) -> Dict[str, Any]:
        batch = default_collate(items)
        return {"image": batch["image"], "targets": {t: batch[key] for t, key in targets.items()}}

    return collate


def in_order(loader: Any) -> Any:
    """Every item of ``loader``'s split in a fixed order, not sharded over torchrun's processes (its
    augmentation, if any, kept): for feature caching, and for process 0's reports at the end of a run.
    A DataLoader gets a new one over its data set; mtl's batched loaders give their own ``in_order()``."""
    if not isinstance(loader, DataLoader):  # mtl's batched loaders (device, dense, cached features) know how
        return loader.in_order()
    return SignalSafeLoader(
        loader.dataset,
        batch_size=loader_batch_size(loader),
        shuffle=False,
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        collate_fn=loader.collate_fn,
        worker_init_fn=ignore_stop_signals,
    )
