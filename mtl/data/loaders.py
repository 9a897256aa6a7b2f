"""Loaders of the per-item path, and every loader's split in a fixed order."""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, List

import torch
from torch.utils.data import DataLoader, default_collate

from mtl.core.errors import UserError
from mtl.core.runtime import ignore_stop_signals, stop_signals_blocked
from mtl.data.batches import StridedBatchSampler, loader_batch_size


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


def reshuffled(loader: Any, generator: torch.Generator) -> Any:
    """``loader``'s training data in another order: the same items, batch size, augmentation and torchrun sharding,
    shuffled (and, for mtl's batched loaders, augmented) by ``generator`` alone, so that iterating it draws nothing
    from ``loader``'s own generator. Bilevel weightings draw their meta batches from it."""
    if isinstance(loader, DataLoader):
        common = dict(
            num_workers=loader.num_workers,
            pin_memory=loader.pin_memory,
            collate_fn=loader.collate_fn,
            worker_init_fn=loader.worker_init_fn,
        )
        sampler = loader.batch_sampler
        if isinstance(sampler, StridedBatchSampler):
            strided = StridedBatchSampler(sampler.n, sampler.batch_size, True, generator, sampler.rank, sampler.world)
            return SignalSafeLoader(loader.dataset, batch_sampler=strided, generator=generator, **common)
        return SignalSafeLoader(
            loader.dataset,
            batch_size=loader_batch_size(loader),
            shuffle=True,
            drop_last=loader.drop_last,
            generator=generator,
            **common,
        )
    if not hasattr(loader, "generator") or not hasattr(loader, "shuffle"):
        raise UserError(
            f"a bilevel weighting draws meta batches from a reshuffled copy of the training loader, but a "
            f"{type(loader).__name__} has no generator to reshuffle with; use a loss-level weighting without meta steps"
        )
    copied = copy.copy(loader)
    copied.generator, copied.shuffle = generator, True
    return copied
