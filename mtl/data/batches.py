"""Batched loading: whole batches gathered by index from a uint8 image store, augmented on the device.

The per-item path (a ``DataLoader`` over ``dataset[i]`` with PIL/v2 transforms) decodes and transforms one
image at a time on the CPU. Here every image is decoded once (``decoded.py``, or already in memory for the
tensor data sets), a batch is one indexing of the store, and cropping, flipping and normalisation happen
for the whole batch in one ``grid_sample`` on the training device (``device_augment.py``).

Splits that are only evaluated store each image's evaluation view instead (``view``): the uint8 pixels of the
per-item eval transform's Resize + CenterCrop, computed once on the CPU by the same torchvision transforms, so that
evaluation sees the same pixels whichever pipeline runs; the device then only converts and normalises them.
"""

from __future__ import annotations

import functools
import os
import queue
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm import tqdm

from mtl.data.decoded import decode_images
from mtl.data.device_augment import BatchAugment
from mtl.data.folder import ImageFolderDataset
from mtl.data.tensor_dataset import TensorImageDataset
from mtl.data.transforms import eval_view

_VIEW_CHUNK = 256  # tensor images transformed to their evaluation views at a time


@dataclass
class ImageStore:
    """``images[indices[i]]`` is item i, with original size ``sizes[indices[i]]`` (None: the stored size).

    ``view`` = (image_size, resize_size): the rows are already the evaluation views of the items, uint8
    (C, image_size, image_size) (``per_batch`` None), or ``per_batch`` makes them from gathered rows on the CPU
    (views over the memory budget); the device then only normalises them."""

    images: Tensor  # uint8 (M, C, h, w)
    sizes: Optional[Tensor]  # long (M, 2) or None
    labels: Tensor  # long (N,)
    indices: Tensor  # long (N,)
    location: str = "memory"
    dropped: int = 0  # items whose file failed to decode (left out)
    view: Optional[Tuple[int, int]] = None
    per_batch: Optional[Callable[[Tensor], Tensor]] = None

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()


def image_store(
    dataset: Dataset,
    *,
    cache_size: int,
    cache_dir: Optional[Path],
    budget_bytes: int,
    progress: bool = True,
    decoded: Optional[Dict[Any, Any]] = None,
    view: Optional[Tuple[int, int]] = None,
) -> Optional[ImageStore]:
    """The store behind a single-label data set (through subsets), or None when it has none (per-item path).
    ``decoded``: image files decoded by earlier calls, by file list and kind; the same files are decoded once.

    ``view`` = (image_size, resize_size): the store holds the evaluation view of each of the data set's items
    (only those), exactly the uint8 pixels of the per-item eval transform (``transforms.eval_view``); image files are
    decoded whole for it (``decode_images(view_resize=)``), tensor images transformed in chunks. Tensor views
    above ``budget_bytes`` are not stored but made per gathered batch on the CPU (same pixels, slower)."""
    labels = getattr(dataset, "labels", None)
    chain: List[List[int]] = []
    base = dataset
    while hasattr(base, "indices") and hasattr(base, "dataset"):
        chain.append(list(base.indices))
        base = base.dataset
    if labels is None or isinstance(getattr(base, "targets", None), dict):
        return None
    if view is not None and isinstance(base, (TensorImageDataset, ImageFolderDataset)):
        return _view_store(base, chain, labels, view, cache_dir, budget_bytes, progress, decoded)
    if isinstance(base, TensorImageDataset):
        images = base.images if base.images.ndim == 4 else base.images.unsqueeze(1)
        sizes, location, n = None, "memory", len(images)
    elif isinstance(base, ImageFolderDataset):
        paths = tuple(p for p, _ in base.samples)
        memo = decoded if decoded is not None else {}
        if (paths, cache_size) not in memo:
            memo[paths, cache_size] = decode_images(
                paths, cache_size, cache_dir=cache_dir, budget_bytes=budget_bytes, progress=progress
            )
        files = memo[paths, cache_size]
        images, sizes, location, n = files.images, files.sizes, files.location, len(files.images)
        failed = set(files.failed)
    else:
        return None
    indices = _base_indices(n, chain)
    labels = torch.as_tensor(labels, dtype=torch.long)
    dropped = 0
    if isinstance(base, ImageFolderDataset) and failed:
        keep = torch.tensor([int(i) not in failed for i in indices])
        indices, labels, dropped = indices[keep], labels[keep], int((~keep).sum())
    return ImageStore(images, sizes, labels, indices, location, dropped)


def _base_indices(n: int, chain: List[List[int]]) -> Tensor:
    """The rows of the base data set (``n`` items) behind the items of the nested subsets ``chain``, outermost first."""
    indices = torch.arange(n)
    for level in reversed(chain):  # innermost subset first
        indices = indices[torch.as_tensor(level, dtype=torch.long)]
    return indices


def _view_store(
    base: Dataset,
    chain: List[List[int]],
    labels: Any,
    view: Tuple[int, int],
    cache_dir: Optional[Path],
    budget_bytes: int,
    progress: bool,
    decoded: Optional[Dict[Any, Any]],
) -> ImageStore:
    """``image_store`` of evaluation views: row i is item i's view (failed files left out)."""
    image_size, resize_size = view
    labels = torch.as_tensor(labels, dtype=torch.long)
    if isinstance(base, TensorImageDataset):
        images = base.images if base.images.ndim == 4 else base.images.unsqueeze(1)
        indices = _base_indices(len(images), chain)
        transform = eval_view(image_size, resize_size)
        needed = len(indices) * images.shape[1] * image_size * image_size
        if needed > budget_bytes:
            warnings.warn(
                f"the evaluation views of {len(indices)} images need {needed / 2**30:.2f} GiB, more than "
                f"data.cache_budget_gb; they are made per batch on the CPU instead (slower), raise the budget to "
                f"keep them in memory",
                stacklevel=3,
            )
            make = functools.partial(_views, transform=transform, size=image_size)
            return ImageStore(images, None, labels, indices, view=view, per_batch=make)
        views = _views(images[indices], transform, image_size, progress)
        return ImageStore(views, None, labels, torch.arange(len(indices)), view=view)
    paths = tuple(base.samples[i][0] for i in _base_indices(len(base.samples), chain).tolist())
    memo = decoded if decoded is not None else {}
    if (paths, view) not in memo:
        memo[paths, view] = decode_images(
            paths,
            image_size,
            cache_dir=cache_dir,
            budget_bytes=budget_bytes,
            progress=progress,
            view_resize=resize_size,
        )
    files = memo[paths, view]
    keep = torch.ones(len(paths), dtype=torch.bool)
    keep[torch.as_tensor(files.failed, dtype=torch.long)] = False
    indices = torch.arange(len(paths))[keep]
    return ImageStore(files.images, None, labels[keep], indices, files.location, int((~keep).sum()), view=view)


def _views(images: Tensor, transform: Callable[[Tensor], Tensor], size: int, progress: bool = False) -> Tensor:
    """uint8 (B, C, H, W) -> their evaluation views (B, C, size, size), ``_VIEW_CHUNK`` images at a time."""
    chunks = range(0, len(images), _VIEW_CHUNK)
    bar = tqdm(
        chunks, desc=f"evaluation views of {len(images)} images", disable=not progress or len(chunks) < 2, leave=False
    )
    out = [transform(images[i : i + _VIEW_CHUNK]).as_subclass(Tensor) for i in bar]
    return torch.cat(out) if out else images.new_zeros((0, images.shape[1], size, size))


class DeviceBatches:
    """An iterable of ``{"image": float (B,3,S,S) on device, "targets": {task: labels}}`` batches.

    ``batch_size`` is the global batch; with ``world`` processes each one gets every world-th item of it.

    ``generator`` drives the shuffle and the augmentation, so a seeded generator gives the same epoch on every
    device. On CUDA the next batch is gathered and copied (pinned, non-blocking) by a thread while the
    current one trains. ``dataset`` and ``collate_fn`` are kept for code that reads single items (image grids).
    ``shift`` (``data.shift``) maps every augmented batch of images.
    """

    def __init__(
        self,
        store: ImageStore,
        augment: BatchAugment,
        *,
        batch_size: int,
        shuffle: bool,
        device: torch.device,
        generator: Optional[torch.Generator] = None,
        target_names: Optional[List[str]] = None,
        dataset: Optional[Dataset] = None,
        collate_fn: Optional[Callable[[List[Any]], Any]] = None,
        rank: int = 0,
        world: int = 1,
        shift: Optional[Callable[[Tensor], Tensor]] = None,
    ) -> None:
        if store.view is not None and (augment.train or store.view != (augment.image_size, augment.resize_size)):
            raise ValueError(f"a store of evaluation views {store.view} needs the matching evaluation, got {augment}")
        self.store, self.augment, self.shift = store, augment, shift
        self.rank, self.world = rank, world  # under torchrun: every process takes every world-th item of a batch
        self.batch_size, self.shuffle, self.device = batch_size, shuffle, device
        self.generator = generator if generator is not None else torch.Generator()
        self.target_names = target_names or ["label"]
        self.dataset, self.collate_fn = dataset, collate_fn

    def in_order(self) -> "DeviceBatches":
        """Every image in order, not sharded over processes (evaluation keeps no augmentation)."""
        return DeviceBatches(
            self.store,
            self.augment,
            batch_size=self.batch_size,
            shuffle=False,
            device=self.device,
            generator=torch.Generator(),
            target_names=self.target_names,
            shift=self.shift,
        )

    def __len__(self) -> int:
        return (len(self.store) + self.batch_size - 1) // self.batch_size

    def _order(self) -> Tensor:
        n = len(self.store)
        return torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)

    def _gather(self, positions: Tensor) -> Dict[str, Any]:
        rows = self.store.indices[positions]
        if self.store.view is not None:  # evaluation views: nothing to draw, nothing to warp
            return self._gather_views(positions, rows)
        if self.store.sizes is not None:
            sizes = self.store.sizes[rows]
        else:
            sizes = torch.tensor(self.store.images.shape[-2:], dtype=torch.long).expand(len(rows), 2)
        theta = self.augment.theta(sizes, self.generator)  # for the whole global batch: same draws on any world size
        draws = self.augment.draw(len(rows), self.generator)  # per-image auto-augment and erasing, likewise
        if self.world > 1:  # this process's share of the global batch
            mine = slice(self.rank, None, self.world)
            positions, rows, theta = positions[mine], rows[mine], theta[mine]
            draws = {k: v[mine] for k, v in draws.items()}
        images = self.store.images[rows]
        labels = self.store.labels[positions]
        if self.device.type == "cuda":
            images, labels, theta = images.pin_memory(), labels.pin_memory(), theta.pin_memory()
        return {
            "images": images.to(self.device, non_blocking=True),
            "labels": labels.to(self.device, non_blocking=True),
            "theta": theta.to(self.device, non_blocking=True),
            "draws": draws,  # on the CPU: the augmentation groups images by them
        }

    def _gather_views(self, positions: Tensor, rows: Tensor) -> Dict[str, Any]:
        if self.world > 1:
            positions, rows = positions[self.rank :: self.world], rows[self.rank :: self.world]
        images = self.store.images[rows]
        if self.store.per_batch is not None:
            images = self.store.per_batch(images)
        labels = self.store.labels[positions]
        if self.device.type == "cuda":
            images, labels = images.pin_memory(), labels.pin_memory()
        return {
            "images": images.to(self.device, non_blocking=True),
            "labels": labels.to(self.device, non_blocking=True),
        }

    def _batch(self, raw: Dict[str, Any]) -> Dict[str, Any]:
        if self.store.view is not None:
            image = self.augment.normalise(raw["images"])
        else:
            image = self.augment(raw["images"], theta=raw["theta"], draws=raw["draws"])
        if self.shift is not None:
            image = self.shift(image)
        return {"image": image, "targets": {t: raw["labels"] for t in self.target_names}}

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        chunks = _shares_exist(self._order().split(self.batch_size), self.shuffle, self.rank, self.world)
        if self.device.type != "cuda":
            for chunk in chunks:
                yield self._batch(self._gather(chunk))
            return
        yield from self._prefetched(chunks)

    def _prefetched(self, chunks: tuple) -> Iterator[Dict[str, Any]]:
        ready: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def produce() -> None:
            try:
                for chunk in chunks:
                    if stop.is_set():
                        return
                    ready.put(self._gather(chunk))
                ready.put(None)
            except BaseException as err:  # re-raised in the consumer
                ready.put(err)

        worker = threading.Thread(target=produce, daemon=True)
        worker.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                yield self._batch(item)
        finally:
            stop.set()
            while worker.is_alive():  # let a blocked put finish
                try:
                    ready.get_nowait()
                except queue.Empty:
                    worker.join(timeout=0.01)


def _shares_exist(chunks: tuple, train: bool, rank: int, world: int) -> tuple:
    """Global batches every process gets a share of: in training a last batch smaller than the number of
    processes is dropped (each step is collective); in evaluation a process skips batches with no share."""
    if world == 1:
        return chunks
    if train:
        return tuple(c for c in chunks if len(c) >= world)
    return tuple(c for c in chunks if len(c) > rank)


class StridedBatchSampler:
    """Index batches for the per-item loader: global batches of ``batch_size`` (shuffled by ``generator``),
    of which this process takes every ``world``-th item from ``rank`` on (torchrun)."""

    def __init__(
        self, n: int, batch_size: int, shuffle: bool, generator: Optional[torch.Generator], rank: int, world: int
    ) -> None:
        self.n, self.batch_size, self.shuffle = n, batch_size, shuffle
        self.generator, self.rank, self.world = generator, rank, world

    def __len__(self) -> int:
        return (self.n + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        order = torch.randperm(self.n, generator=self.generator) if self.shuffle else torch.arange(self.n)
        for chunk in _shares_exist(order.split(self.batch_size), self.shuffle, self.rank, self.world):
            yield chunk[self.rank :: self.world].tolist()


def default_cache_dir(root: Optional[str]) -> Optional[Path]:
    """``<data root>/.mtl_cache`` when the data root is a writable folder, else None."""
    if root is None:
        return None
    path = Path(root).expanduser() / ".mtl_cache"
    return path if os.access(path.parent, os.W_OK) else None


def loader_batch_size(loader: Any) -> int:
    """The global batch size of a DataLoader, DeviceBatches or a DataLoader over a StridedBatchSampler."""
    size = getattr(loader, "batch_size", None)
    if size is None and getattr(loader, "batch_sampler", None) is not None:
        size = getattr(loader.batch_sampler, "batch_size", None)
    return int(size or 32)
