"""One encoder column per task, connected between stages: Cross-stitch networks and Learning to Branch (LTB).

Each column is a copy of the configured encoder cut into its stages (``mtl.models.stages``); task t's features are
column t's stage maps, with ``"out"`` the mean of its last map. Every column reaches every task's loss through the
connections, so every parameter is shared, and no tensor is shared by every task at the output:
``grad_on: representation`` is refused for both.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from mtl.core.errors import UserError
from mtl.models.arch import Architecture, register_arch
from mtl.models.experts import _per_task
from mtl.models.stages import stage_chain


class _Columns(Architecture):
    def __init__(self, encoder: nn.Module, make_encoder: Callable[[], nn.Module], tasks: Sequence[str]) -> None:
        super().__init__(encoder, tasks)
        arch = type(self).arch_name
        self.columns = nn.ModuleList(
            stage_chain(encoder if i == 0 else make_encoder(), arch) for i in range(len(self.tasks))
        )
        self.stage_names = [info["name"] for info in self.feature_info]
        self.out_dim = self.feature_info[-1]["channels"]

    def split(self, rep: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
        return _per_task(rep, self.tasks, self.stage_names)


@register_arch("cross_stitch")
class CrossStitch(_Columns):
    """Cross-stitch networks (Misra et al., CVPR 2016, eq. 1): after every stage l the columns' maps are mixed,
    ``x~_t = sum_s alpha^l_ts x_s``, with one learned T x T matrix per channel. Initialised as the paper's best
    setting, ``alpha_same`` (0.9) on the diagonal and ``(1 - alpha_same) / (T - 1)`` off it (0.1 for two tasks).
    The paper trains the units with a larger learning rate: ``optim.lr_mult: {encoder.stitch: 100}``."""

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        alpha_same: float = 0.9,
    ) -> None:
        super().__init__(encoder, make_encoder, tasks)
        if not isinstance(alpha_same, (int, float)) or not 0 <= alpha_same <= 1:
            raise UserError(f"model.arch_options.alpha_same for cross_stitch must be in [0, 1], got {alpha_same!r}")
        t = len(self.tasks)
        other = (1.0 - alpha_same) / (t - 1) if t > 1 else 0.0
        init = torch.full((t, t), other) + torch.eye(t) * (alpha_same - other)
        self.stitch = nn.ParameterList(
            nn.Parameter(init.expand(info["channels"], t, t).clone()) for info in self.feature_info
        )

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        maps = [x] * len(self.tasks)
        rep = {}
        for j, name in enumerate(self.stage_names):
            maps = [column[j](m) for column, m in zip(self.columns, maps)]
            stacked = torch.stack(maps, dim=1)  # (B, T, C, h, w)
            mixed = torch.einsum("cts,bschw->btchw", self.stitch[j].to(stacked.dtype), stacked)
            maps = list(mixed.unbind(1))
            rep |= {f"{t}.{name}": m for t, m in zip(self.tasks, maps)}
        return rep


@register_arch("ltb")
class LearningToBranch(_Columns):
    """Learning to Branch (Guo, Lee, Ulbricht, ICML 2020, eq. 2-4): a tree grown over T columns. The input of
    column t's stage l > 1 is one parent among the columns' stage l-1 outputs, ``sum_s d^l_ts x_s``, with
    ``d^l_t = GumbelSoftmax(theta^l_t, tau)`` one-hot in the forward pass and soft in the backward pass
    (straight-through) while training, and ``argmax theta^l_t`` in evaluation: columns that pick the same parent
    share everything below it. ``theta`` starts at 0 (every parent equally likely). The temperature of epoch e is
    ``tau * tau_decay^e`` (5, 0.965 per epoch; the paper anneals it, these values are this implementation's). The
    Gumbel noise comes from a generator seeded by the run's seed and a checkpointed draw count: every torchrun
    process draws the same tree, and a resumed run draws what it would have.
    """

    def __init__(
        self,
        encoder: nn.Module,
        make_encoder: Callable[[], nn.Module],
        tasks: Sequence[str],
        input_size: Sequence[int],
        tau: float = 5.0,
        tau_decay: float = 0.965,
    ) -> None:
        super().__init__(encoder, make_encoder, tasks)
        if not isinstance(tau, (int, float)) or tau <= 0:
            raise UserError(f"model.arch_options.tau for ltb must be a positive number, got {tau!r}")
        if not isinstance(tau_decay, (int, float)) or not 0 < tau_decay <= 1:
            raise UserError(f"model.arch_options.tau_decay for ltb must be in (0, 1], got {tau_decay!r}")
        t, levels = len(self.tasks), len(self.stage_names)
        self.tau, self.tau_decay = float(tau), float(tau_decay)
        self.branch_logits = nn.Parameter(torch.zeros(max(levels - 1, 0), t, t))
        self.draws = 0  # Gumbel draws so far (checkpointed as extra state, kept on the host: no device sync)
        self.epoch = 0
        self.seed = 0  # the run's seed (train.seed), set by build_model

    def get_extra_state(self) -> dict:
        return {"draws": self.draws}

    def set_extra_state(self, state: dict) -> None:
        self.draws = int(state.get("draws", 0))

    def set_epoch(self, epoch: int) -> None:
        """The temperature follows the epoch (called before each training epoch)."""
        self.epoch = int(epoch)

    def choices(self) -> Tensor:
        """(L-1, T, T): row t of level l weighs the parents of column t's stage l+1 (one-hot values)."""
        theta = self.branch_logits
        if not self.training:
            return F.one_hot(theta.argmax(-1), theta.shape[-1]).to(theta.dtype)
        self.draws += 1
        seed = self.seed * 1_000_003 + self.draws
        u = torch.rand(theta.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-12))).to(theta.device, theta.dtype)
        tau = self.tau * self.tau_decay**self.epoch
        soft = ((theta + gumbel) / tau).softmax(-1)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
        return hard + (soft - soft.detach())  # exactly one-hot forward, the soft gradient backward

    def parents(self) -> List[List[int]]:
        """The tree evaluation uses: ``parents()[l][t]`` is the column whose stage l+1 output feeds column t."""
        return self.branch_logits.argmax(-1).tolist()

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        d = self.choices() if len(self.stage_names) > 1 else None
        maps = [x] * len(self.tasks)
        rep = {}
        for j, name in enumerate(self.stage_names):
            if j > 0:
                stacked = torch.stack(maps, dim=1)  # (B, T, C, h, w)
                maps = list(torch.einsum("ts,bschw->btchw", d[j - 1].to(stacked.dtype), stacked).unbind(1))
            maps = [column[j](m) for column, m in zip(self.columns, maps)]
            rep |= {f"{t}.{name}": m for t, m in zip(self.tasks, maps)}
        return rep
