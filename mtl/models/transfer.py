"""The model every feature trains: a shared encoder feeding one head per task."""

from __future__ import annotations

from itertools import chain
from typing import Dict, Iterator, Optional, Sequence, Tuple

from torch import Tensor, nn

from mtl.models.arch import Architecture
from mtl.models.freezing import eval_frozen
from mtl.models.heads import call_head, head_input


class TransferModel(nn.Module):
    """``forward(x) -> {task: output}``: ``decode(encode(x))``.

    Each head is called as its ``input`` declares (``mtl.models.heads.head_input``, read once here): pooled heads
    see the encoder's pooled features (``"out"``), "features" heads its whole dict of stage maps, dense heads that
    dict and the input size. With ``mtan`` (task attention over the encoder's stages) each task sees its own attended
    features.
    Frozen modules stay in eval mode in ``train()`` (see ``mtl.freezing.eval_frozen``): a frozen encoder computes
    the same features in training as in evaluation, and its normalisation statistics never change.
    """

    def __init__(self, encoder: nn.Module, heads: Dict[str, nn.Module], mtan: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.mtan = mtan
        self.head_inputs: Dict[str, str] = {task: head_input(head) for task, head in self.heads.items()}

    def encode(self, x: Tensor) -> Dict[str, Tensor]:
        """The shared representation: stage maps and pooled ``"out"``."""
        return self.encoder(x)

    def decode(
        self, features: Dict[str, Tensor], size: Tuple[int, int], tasks: Optional[Sequence[str]] = None
    ) -> Dict[str, Tensor]:
        """Task outputs from the shared features; dense outputs at ``size``. ``tasks``: only these tasks' heads run
        (a multi-input run's batch belongs to one task); None: all."""
        if isinstance(self.encoder, Architecture):
            per_task = self.encoder.split(features)
        else:
            per_task = self.mtan(features) if self.mtan is not None else None
        outputs = {}
        for task, head in self.heads.items():
            if tasks is not None and task not in tasks:
                continue
            f = per_task[task] if per_task is not None else features
            outputs[task] = call_head(head, self.head_inputs[task], f, size)
        return outputs

    def forward(self, x: Tensor, tasks: Optional[Sequence[str]] = None) -> Dict[str, Tensor]:
        return self.decode(self.encode(x), tuple(x.shape[-2:]), tasks)

    @property
    def encoder_representation(self) -> Optional[str]:
        """What ``grad_on: representation`` differentiates (None: no tensor is shared by every task)."""
        if isinstance(self.encoder, Architecture):
            return self.encoder.representation
        return "the encoder's output"

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters every task's loss depends on (the encoder's, or those its architecture declares shared)."""
        if isinstance(self.encoder, Architecture):
            return self.encoder.shared_parameters()
        return self.encoder.parameters()

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters owned by single tasks: heads and, with MTAN, the attention modules (with an architecture: what
        it declares task-owned, e.g. gates)."""
        if isinstance(self.encoder, Architecture):
            return chain(self.heads.parameters(), self.encoder.task_parameters())
        return chain(self.heads.parameters(), self.mtan.parameters() if self.mtan is not None else ())

    def train(self, mode: bool = True) -> "TransferModel":
        super().train(mode)
        if mode:
            eval_frozen(self, self.encoder)
        return self
