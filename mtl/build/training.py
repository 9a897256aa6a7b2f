"""What the trainer is given, from a config: its options."""
from __future__ import annotations

from typing import Any

import torch

from mtl.config.schema import Config
from mtl.core.runtime import use_amp
from mtl.engine.trainer import TrainerOptions


def trainer_options(cfg: Config, device: torch.device, generator: torch.Generator, *, quiet: bool = False,
                    **more: Any) -> TrainerOptions:
    """The loop's settings from ``cfg.train`` (epochs, amp, grad_clip, progress unless ``quiet``, seed) on
    ``device``, with ``generator`` as the shuffle generator; ``more`` sets further fields (grad_on, monitor, ...)."""
    return TrainerOptions(epochs=cfg.train.epochs, device=device, amp=use_amp(cfg.train.amp, device),
                          grad_clip=cfg.train.grad_clip, progress=cfg.train.progress and not quiet,
                          seed=cfg.train.seed, generator=generator, **more)
