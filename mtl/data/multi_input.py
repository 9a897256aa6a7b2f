"""Multi-input runs (``tasks.<t>.data``): one loader per task, and one batch of every task per step."""

from __future__ import annotations

from typing import Any, Dict, Iterator, Mapping, Optional

import torch

from mtl.core.errors import UserError
from mtl.data.batches import loader_batch_size
from mtl.data.loaders import in_order


class MultiInputLoader:
    """Batches ``{"inputs": {task: that task's batch {"image", "targets": {task: y}}}}``, one of every task.

    An epoch is as many steps as the longest task loader has batches (LibMTL's ``multi_input`` epoch); a shorter
    loader starts a new, reshuffled pass when it runs out. Unlike LibMTL, every loader starts afresh each epoch: with
    ``generator`` (the trainer's, re-seeded each epoch), each ``iter()`` seeds every task's own shuffle generator
    (``generators``) with a draw of it, so a task's order is a function of (seed, epoch, task), and a resumed epoch
    replays it. Evaluation (``engine.evaluate``) goes through ``loaders`` one task at a time.
    ``dataset`` and ``collate_fn`` are the first task's (the TensorBoard grid shows its images).
    """

    def __init__(
        self,
        loaders: Mapping[str, Any],
        generator: Optional[torch.Generator] = None,
        generators: Optional[Mapping[str, torch.Generator]] = None,
    ) -> None:
        empty = [t for t, loader in loaders.items() if len(loader) == 0]
        if empty:
            raise UserError(
                f"task {empty[0]}'s data gives no batches; give tasks.{empty[0]}.data more images or a smaller batch"
            )
        self.loaders = dict(loaders)
        self.generator, self.generators = generator, dict(generators or {})
        first = next(iter(self.loaders.values()))
        self.dataset, self.collate_fn = getattr(first, "dataset", None), getattr(first, "collate_fn", None)
        self.batch_size = max(loader_batch_size(loader) for loader in self.loaders.values())

    def __len__(self) -> int:
        return max(len(loader) for loader in self.loaders.values())

    def in_order(self) -> "MultiInputLoader":
        """Every task's items in a fixed order, not sharded over processes."""
        return MultiInputLoader({t: in_order(loader) for t, loader in self.loaders.items()})

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        if self.generator is not None:
            seeds = torch.randint(0, 2**62, (len(self.loaders),), generator=self.generator).tolist()
            for t, seed in zip(self.loaders, seeds):
                if t in self.generators:
                    self.generators[t].manual_seed(seed)
        running = {t: iter(loader) for t, loader in self.loaders.items()}
        for _ in range(len(self)):
            batch = {}
            for t, loader in self.loaders.items():
                try:
                    batch[t] = next(running[t])
                except StopIteration:  # a shorter loader: its next pass
                    running[t] = iter(loader)
                    batch[t] = next(running[t])
            yield {"inputs": batch}
