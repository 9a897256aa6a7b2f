"""Task heads: decoders from the encoder's pooled features to one task's output."""
from __future__ import annotations

from torch import nn

from .registry import Registry

HEADS = Registry("head")


@HEADS.register("linear")
def linear_head(*, in_dim: int, out_dim: int, dropout: float = 0.0, hidden: int = 0) -> nn.Module:
    """A single linear layer, optionally after dropout (the tutorials' replaced ``fc``)."""
    layers = [nn.Dropout(dropout)] if dropout > 0 else []
    return nn.Sequential(*layers, nn.Linear(in_dim, out_dim))


@HEADS.register("mlp")
def mlp_head(*, in_dim: int, out_dim: int, hidden: int = 512, dropout: float = 0.5) -> nn.Module:
    """Linear -> ReLU -> Dropout -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_dim))
