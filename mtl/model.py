"""The model every feature trains: an encoder feeding one head per task."""
from __future__ import annotations

from typing import Dict

from torch import Tensor, nn

from .freezing import freeze_norm_stats


class TransferModel(nn.Module):
    """``forward(x) -> {task: output}``; frozen normalisation layers keep their statistics in train()."""

    def __init__(self, encoder: nn.Module, heads: Dict[str, nn.Module]) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        pooled = self.encoder(x)["out"]  # (B, D)
        return {task: head(pooled) for task, head in self.heads.items()}

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            freeze_norm_stats(self)
        return self
