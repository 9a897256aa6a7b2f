"""MTAN: task-specific soft attention over a shared encoder's stages (Liu, Johns, Davison, CVPR 2019).

For task t and stage j with shared map u_j, the attended map is  a_j * u_j  with the mask
``a_j = sigmoid(g_j(cat[u_j, f_j(a_{j-1} * u_{j-1})]))`` (``a_1 = sigmoid(g_1(u_1))``): g_j is conv1x1-BN-ReLU-
conv1x1-BN, f_j a 3x3 conv-BN-ReLU to stage j's channels followed by adaptive max pooling to stage j's size
(the identity where reductions repeat, as in dilated encoders). Every module here belongs to one task.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from einops import reduce
from torch import Tensor, nn
from torch.nn import functional as F

from mtl.core.errors import UserError


def _conv_bn(c_in: int, c_out: int, kernel: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(c_out)]


class StageAttention(nn.Module):
    """One task's attention at one stage: ``mask(u, previous attended map or None) -> a`` in (0, 1)."""

    def __init__(self, channels: int, prev_channels: int | None) -> None:
        super().__init__()
        c_in = channels if prev_channels is None else 2 * channels
        self.bring = None
        if prev_channels is not None:
            self.bring = nn.Sequential(*_conv_bn(prev_channels, channels, 3), nn.ReLU(inplace=True))
        self.gate = nn.Sequential(
            *_conv_bn(c_in, channels, 1), nn.ReLU(inplace=True), *_conv_bn(channels, channels, 1), nn.Sigmoid()
        )

    def forward(self, u: Tensor, prev: Tensor | None) -> Tensor:
        if self.bring is None:
            return self.gate(u)
        p = F.adaptive_max_pool2d(self.bring(prev), u.shape[-2:])
        return self.gate(torch.cat([u, p], dim=1))


class MTAN(nn.Module):
    """Per-task attention over the encoder's stages.

    ``forward(features) -> {task: {stage: attended map, ..., "out": (B, C_last) mean of the last attended map}}``;
    stages not chosen pass through unattended, so dense heads built on ``feature_info`` still find every stage.
    ``out_dim`` is the last chosen stage's channels; ``feature_info`` is the encoder's.
    """

    def __init__(
        self, feature_info: Sequence[dict[str, Any]], tasks: Sequence[str], stages: Sequence[str] | None = None
    ) -> None:
        super().__init__()
        names = [info["name"] for info in feature_info]
        if not names:
            raise UserError("MTAN needs an encoder with stage features (feature_info is empty)")
        if not tasks:
            raise UserError("MTAN needs at least one task")
        if stages is not None:
            unknown = [s for s in stages if s not in names]
            if isinstance(stages, str) or not stages or unknown:
                raise UserError(
                    f"MTAN stages must be a non-empty list of stage names from {', '.join(names)}, got {stages!r}"
                )
        self.feature_info = list(feature_info)
        chosen = [info for info in feature_info if stages is None or info["name"] in stages]
        self.stage_names = [info["name"] for info in chosen]
        self.out_dim = chosen[-1]["channels"]
        self.attention = nn.ModuleDict()
        for task in tasks:
            prev = [None] + [info["channels"] for info in chosen[:-1]]
            self.attention[task] = nn.ModuleList(StageAttention(info["channels"], p) for info, p in zip(chosen, prev))

    @property
    def tasks(self) -> list[str]:
        return list(self.attention)

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        """The attention parameters of ``task`` (no other task's output depends on them)."""
        if task not in self.attention:
            raise UserError(f"MTAN has no task {task!r}; tasks: {', '.join(self.attention)}")
        return self.attention[task].parameters()

    def attend(self, features: dict[str, Tensor]) -> dict[str, tuple[dict[str, Tensor], dict[str, Tensor]]]:
        """``{task: (attended maps, masks)}`` keyed by chosen stage name."""
        result = {}
        for task, blocks in self.attention.items():
            attended, masks, prev = {}, {}, None
            for name, block in zip(self.stage_names, blocks):
                u = features[name]
                masks[name] = block(u, prev)
                attended[name] = prev = masks[name] * u
            result[task] = (attended, masks)
        return result

    def masks(self, features: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        """The attention masks, ``{task: {stage: (B, C, h, w) in (0, 1)}}``."""
        return {task: masks for task, (_, masks) in self.attend(features).items()}

    def forward(self, features: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
        shared = {k: v for k, v in features.items() if k != "out"}
        out = {}
        for task, (attended, _) in self.attend(features).items():
            out[task] = shared | attended
            out[task]["out"] = reduce(attended[self.stage_names[-1]], "b c h w -> b c", "mean")
        return out
