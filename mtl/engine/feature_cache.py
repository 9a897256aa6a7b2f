"""Training heads on cached encoder features when nothing before the heads trains.

With a frozen encoder (``model.freeze: all``, no unfreezing), pooled heads and deterministic inputs, every
epoch would compute the same encoder features again. They are computed once (in eval mode) instead, and the
heads train on them: the "pipeline" of the reference tutorials, where a pretrained model's outputs become
the input of the new model. With augmentation, ``feature_views`` augmented views are cached and epoch e
uses view ``e % feature_views``.
"""

from __future__ import annotations

import time
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mtl.core import distributed as dist
from mtl.core.errors import UserError
from mtl.core.runtime import evaluating
from mtl.core.waiting import ANNOUNCE_AFTER_S, announced
from mtl.data.batches import loader_batch_size
from mtl.models.arch import Architecture
from mtl.models.heads import POOLED, head_input
from mtl.models.transfer import TransferModel


def feature_cache_blocker(model: nn.Module, *, unfreezing: bool, augmenting: bool, mode: str) -> Optional[str]:
    """Why the features of ``model`` cannot be cached under ``train.cache_features=mode`` (None: they can)."""
    if mode == "off":
        return "train.cache_features is off"
    if not isinstance(model, TransferModel) or model.mtan is not None or isinstance(model.encoder, Architecture):
        return "the model is not one shared encoder with heads"
    if any(p.requires_grad for p in model.encoder.parameters()) or unfreezing:
        return "the encoder trains (set model.freeze=all without train.unfreeze)"
    if any(head_input(h) != POOLED for h in model.heads.values()):
        return "a head reads stage maps (only pooled heads train on cached features)"
    if mode == "auto" and augmenting:
        return (
            "data augmentation is on (data.augment, auto_augment or random_erasing; set train.cache_features=on to "
            "cache train.feature_views augmented views)"
        )
    return None


class HeadsOnFeatures(nn.Module):
    """``model`` whose forward takes cached pooled features (B, D) (images still work); saves and loads as ``model``."""

    def __init__(self, model: TransferModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if x.ndim == 2:
            return self.model.decode({"out": x}, (0, 0))
        return self.model(x)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.shared_parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        return self.model.task_parameters()

    def state_dict(self, *args: Any, **kwargs: Any) -> Dict[str, Any]:
        return self.model.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self.model.load_state_dict(state_dict, strict=strict, assign=assign)


@torch.no_grad()
def encode_all(
    model: TransferModel,
    loader: Iterable[Dict[str, Any]],
    device: torch.device,
    amp: bool = False,
    desc: str = "features",
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Pooled encoder features (N, D) float32 and the targets of every batch of ``loader``, in its order."""
    feats: List[Tensor] = []
    targets: Dict[str, List[Tensor]] = {}
    with evaluating(model):
        total = len(loader) if hasattr(loader, "__len__") else None
        for batch in tqdm(iter(loader), total=total, desc=desc, leave=False, disable=None):  # one iter(): see evaluate
            x = batch["image"].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                feats.append(model.encode(x)["out"].float())
            for t, y in batch["targets"].items():
                targets.setdefault(t, []).append(y.to(device, non_blocking=True))
    if not feats:
        raise UserError("the data set is empty: no features to cache")
    return torch.cat(feats), {t: torch.cat(ys) for t, ys in targets.items()}


class FeatureBatches:
    """Batches ``{"image": features (B, D), "targets": ...}`` of cached features; view ``epoch % views`` per epoch.

    ``generator`` shuffles (the trainer reseeds it every epoch); each full pass moves to the next view.
    ``dataset`` and ``collate_fn`` of the image loader are kept for code that reads single images.
    """

    def __init__(
        self,
        views: Tensor,
        targets: Dict[str, Tensor],
        *,
        batch_size: int,
        shuffle: bool,
        generator: Optional[torch.Generator] = None,
        dataset: Any = None,
        collate_fn: Any = None,
        shard: bool = True,
    ) -> None:
        self.views, self.targets = views, targets  # (V, N, D), {task: (N, ...)}
        self.shard = shard  # under torchrun, yield this process's share of each batch
        self.batch_size, self.shuffle = batch_size, shuffle
        self.generator = generator if generator is not None else torch.Generator()
        self.dataset, self.collate_fn = dataset, collate_fn
        self.passes = 0

    def in_order(self) -> "FeatureBatches":
        """Every item in order, not sharded over processes."""
        return FeatureBatches(
            self.views,
            self.targets,
            batch_size=self.batch_size,
            shuffle=False,
            dataset=self.dataset,
            collate_fn=self.collate_fn,
            shard=False,
        )

    def __len__(self) -> int:
        return (self.views.shape[1] + self.batch_size - 1) // self.batch_size

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        features = self.views[self.passes % len(self.views)]
        self.passes += 1
        n = features.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        order = order.to(features.device)
        rank, world = (dist.rank(), dist.world_size()) if self.shard else (0, 1)
        for chunk in order.split(self.batch_size):
            if world > 1:  # this process's share of the global batch, as in DeviceBatches
                if (self.shuffle and len(chunk) < world) or len(chunk) <= rank:
                    continue
                chunk = chunk[rank::world]
            yield {"image": features[chunk], "targets": {t: y[chunk] for t, y in self.targets.items()}}


def cache_features(
    model: TransferModel,
    loaders: Mapping[str, Any],
    extraction: Mapping[str, Any],
    views: int,
    device: torch.device,
    amp: bool,
    generator: torch.Generator,
    seed: int,
) -> Tuple[Dict[str, FeatureBatches], float]:
    """Feature loaders replacing ``loaders`` and the seconds spent computing them.

    ``extraction[split]`` iterates the split in a fixed order with its own transforms; the train split is read
    ``views`` times (its augmentation, if any, reseeded per view). A wait of more than ``ANNOUNCE_AFTER_S`` says so
    in one line (also in a log, where the progress bars are off) and again when it is done (process 0).
    """
    started = time.perf_counter()
    images = {split: _size(extraction[split]) for split in loaders}
    shown = ", ".join(
        f"{n} {split}" + (f" x {views} views" if split == "train" and views > 1 else "") for split, n in images.items()
    )
    with announced(
        f"caching encoder features of {shown} images (once; the heads then train on them)",
        lambda seconds: f"cached encoder features in {seconds:.1f} s",
        ANNOUNCE_AFTER_S,
        enabled=dist.is_main(),  # under torchrun every process caches its features; one says so
    ):
        out: Dict[str, FeatureBatches] = {}
        for split, loader in loaders.items():
            n_views = views if split == "train" else 1
            stacked, targets = [], {}
            for v in range(n_views):
                torch.manual_seed(seed * 1000 + v)
                rng = getattr(extraction[split], "generator", None)
                if rng is not None:
                    rng.manual_seed(seed * 1000 + v)
                feats, targets = encode_all(
                    model, extraction[split], device, amp, desc=f"{split} features {v + 1}/{n_views}"
                )
                stacked.append(feats)
            out[split] = FeatureBatches(
                torch.stack(stacked),
                targets,
                batch_size=loader_batch_size(loader),
                shuffle=split == "train",
                generator=generator if split == "train" else None,
                dataset=getattr(loader, "dataset", None),
                collate_fn=getattr(loader, "collate_fn", None),
            )
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return out, time.perf_counter() - started


def _size(loader: Any) -> str:
    """How many images ``loader`` reads (its data set's or image store's length), or ``?`` when it cannot say."""
    for source in (getattr(loader, "dataset", None), getattr(loader, "store", None)):
        try:
            return str(len(source))
        except TypeError:
            continue
    return "?"
