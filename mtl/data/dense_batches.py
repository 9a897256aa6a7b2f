"""Batched loading for multitask data sets held in memory (or decoded once): whole batches of images and their
targets gathered by index and augmented on the device, instead of one item at a time through a DataLoader.

A data set takes part by offering two methods:

- ``draw(n, generator) -> {name: (n, ...) tensor}``: the random parameters of n items' augmentation (flips,
  shifts), drawn on the CPU for the whole global batch, so that any number of processes sees the same epoch;
- ``gather(rows, device, params) -> {key: batch}``: the items ``rows`` as ``__getitem__`` would give them,
  stacked on ``device`` and augmented with ``params`` (None: not augmented);
- optionally ``prepare(cache_size=, cache_dir=, budget_bytes=, progress=)``, called once before training
  (celeba decodes its files there).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch import Tensor
from torch.utils.data import Dataset

from mtl.data.batches import _shares_exist
from mtl.data.dense_transforms import Specs, hflip


def can_gather(dataset: Dataset) -> bool:
    return callable(getattr(dataset, "gather", None)) and callable(getattr(dataset, "draw", None))


class DenseBatches:
    """An iterable of ``{"image": (B,3,H,W) on device, "targets": {task: batch}}`` from ``dataset.gather``.

    ``targets`` maps task names to item keys. ``batch_size`` is the global batch; with ``world`` processes each
    takes every world-th item of it. ``generator`` drives the order and, with ``augment``, the augmentation.
    ``collate_fn`` is kept for code that reads single items. ``shift`` (``data.shift``) maps every batch of images.
    """

    def __init__(
        self,
        dataset: Dataset,
        targets: Dict[str, str],
        *,
        batch_size: int,
        shuffle: bool,
        augment: bool,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        rank: int = 0,
        world: int = 1,
        shift: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        self.dataset, self.targets, self.shift = dataset, dict(targets), shift
        self.batch_size, self.shuffle, self.augment, self.device = batch_size, shuffle, augment, device
        self.generator = generator if generator is not None else torch.Generator()
        self.collate_fn = collate_fn
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return (len(self.dataset) + self.batch_size - 1) // self.batch_size

    def in_order(self) -> "DenseBatches":
        """Every item in order, not sharded over processes; its augmentation, if any, kept (cached feature views)."""
        return DenseBatches(
            self.dataset,
            self.targets,
            batch_size=self.batch_size,
            shuffle=False,
            augment=self.augment,
            device=self.device,
            collate_fn=self.collate_fn,
            shift=self.shift,
        )

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        n = len(self.dataset)
        if self.shuffle:  # a DataLoader draws its workers' base seed first: shuffle as the per-item path does
            torch.empty((), dtype=torch.int64).random_(generator=self.generator)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for rows in _shares_exist(order.split(self.batch_size), self.shuffle, self.rank, self.world):
            params = self.dataset.draw(len(rows), self.generator) if self.augment else None
            if self.world > 1:
                rows = rows[self.rank :: self.world]
                params = {k: v[self.rank :: self.world] for k, v in params.items()} if params is not None else None
            items = self.dataset.gather(rows, self.device, params)
            image = items["image"] if self.shift is None else self.shift(items["image"])
            yield {"image": image, "targets": {t: items[key] for t, key in self.targets.items()}}


def random_flips(n: int, generator: torch.Generator) -> Dict[str, Tensor]:
    """``{"flip": (n,) bool}``, each item mirrored with probability 1/2."""
    return {"flip": torch.rand(n, generator=generator) < 0.5}


def shift_batch(images: Tensor, top: Tensor, left: Tensor, max_shift: int) -> Tensor:
    """``dense_transforms.random_shift`` of a (B,C,H,W) batch with given offsets (each in [0, 2 * max_shift]):
    item b is cut from its border-replicated padding at (top[b], left[b])."""
    b, c, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4, mode="replicate")
    ys = top.to(images.device)[:, None] + torch.arange(h, device=images.device)  # (B, h)
    xs = left.to(images.device)[:, None] + torch.arange(w, device=images.device)  # (B, w)
    rows = padded.gather(2, ys[:, None, :, None].expand(b, c, h, padded.shape[-1]))
    return rows.gather(3, xs[:, None, None, :].expand(b, c, h, w))


def flip_batch(batch: Dict[str, Tensor], flip: Tensor, specs: Specs) -> None:
    """``dense_transforms.hflip``, in place, of the items of a batch where ``flip`` is true; ``specs``: the data
    set's target specs (each target flips as its type says)."""
    if not bool(flip.any()):
        return
    idx = flip.nonzero().squeeze(1).to(batch["image"].device)
    for key, value in hflip({k: batch[k][idx] for k in ("image", *specs) if k in batch}, specs).items():
        batch[key][idx] = value


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """``x`` copied to ``device``: pinned and non-blocking on CUDA."""
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)
