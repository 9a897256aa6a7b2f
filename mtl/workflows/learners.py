"""Continual-learning methods ("learners"), one registered class each: ``@LEARNERS.register("name")``.

A learner owns the networks of a task sequence. For task ``k`` it gives the model to train (``train_model``), the
task that model is trained and scored with (``task``: class-incremental tasks score over one growing head), a
:class:`~mtl.engine.extension.StepExtension` that changes the training step (``extension``: penalties, replay,
gradient projection), and after training it consolidates (``end_task``: Fisher information, importances, a copy of
the old model, ...). Its state across tasks (``state_dict``) is saved with each task's run, so a resumed sequence
continues exactly.

Scenarios (``continual.scenario``; van de Ven & Tolias 2019, "Three scenarios for continual learning"):
``task`` (task identity given at test time: a head per task), ``class`` (no task identity: one head whose outputs
grow by each task's classes; task ``j``'s labels are classes ``offset_j .. offset_j + n_j - 1`` of it) and
``domain`` (no task identity, the same classes in every task: one head for all). A learner lists the scenarios it
can run in ``scenarios``.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar, Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn

from mtl.build.model import build_head, config_encoder
from mtl.config.schema import Config, HeadCfg
from mtl.core.errors import UserError
from mtl.core.registry import Registry
from mtl.engine.extension import StepExtension
from mtl.models.freezing import apply_freeze
from mtl.models.heads import POOLED, head_input
from mtl.models.progressive import ProgressiveNet
from mtl.models.transfer import TransferModel
from mtl.tasks.base import Task

LEARNERS = Registry("continual method")
SCENARIOS = ("task", "class", "domain")


def pooled_head(cfg: Config, name: str, task: Task, in_dim: int) -> nn.Module:
    """Stage ``name``'s head on the encoder's pooled features; a dense or stage-map head is refused in one line."""
    head_cfg = next(iter(cfg.tasks.values())).head or HeadCfg()
    message = f"stage {name!r}: continual methods need a pooled head (linear or mlp), not {head_cfg.name!r}"
    try:
        head = build_head(cfg, name, task, in_dim, feature_info=None)
    except UserError as e:
        if "feature_info" in str(e):
            raise UserError(message) from None
        raise
    if head_input(head) != POOLED:
        raise UserError(message)
    return head


class ClassIncrementalTask:
    """Task ``j`` of a class-incremental sequence: its own labels ``0..n_j-1`` are the classes ``offset ..
    offset + n_j - 1`` of one head over every class seen so far, so its loss and accuracy are over all of them
    (no task identity). Everything else is the wrapped task's."""

    confusion = False  # predictions range over every class seen, not this task's

    def __init__(self, task: Task, offset: int) -> None:
        self.wrapped, self.offset = task, offset

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.wrapped.loss(pred, target + self.offset)

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        return self.wrapped.update(state, pred, target + self.offset)

    def correct(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.wrapped.correct(pred, target + self.offset)


class ConcatHeads(nn.Module):
    """One class-incremental head: the outputs of the heads of tasks 0..k side by side (task j's classes at its
    offset). Each task adds a head of its own classes, so earlier parameters keep their shapes."""

    input = POOLED

    def __init__(self, heads: List[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(heads)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([head(x) for head in self.parts], dim=1)


class Learner:
    """A continual-learning method: what trains on task ``k`` and what predicts task ``j``.

    Subclasses take ``(top, device)`` and their options (``continual.options.<name>``) as keyword arguments with the
    paper's defaults. ``k`` counts tasks from 0; ``st`` is the task's :class:`~mtl.workflows.continual.SequenceTask`.
    """

    scenarios: ClassVar[Tuple[str, ...]] = SCENARIOS
    scenario_reason: ClassVar[str] = ""  # why the other scenarios are refused

    def __init__(self, top: Config, device: torch.device) -> None:
        self.top, self.device = top, device
        self.scenario = top.continual.scenario

    def train_model(self, k: int, st: Any) -> nn.Module:
        raise NotImplementedError

    def eval_model(self, j: int, st: Any) -> nn.Module:
        raise NotImplementedError

    def added_parameters(self, k: int, st: Any) -> int:
        """Parameters added for task k (a column with its laterals, or a head)."""
        raise NotImplementedError

    def task(self, j: int, st: Any) -> Task:
        """The task that task ``j``'s data is trained and scored with."""
        return st.task

    def extension(self, k: int, st: Any) -> Optional[StepExtension]:
        """What changes the training steps of task ``k`` (None: plain training)."""
        return None

    def end_task(self, k: int, st: Any, model: nn.Module) -> None:
        """After task ``k`` trained (``model`` holds the weights it ended with): consolidate what later tasks need."""

    def state_dict(self) -> Dict[str, Any]:
        """What ``end_task`` kept (tensors, numbers, lists), saved with each task's run; {} when nothing."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


def learner_options(name: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``continual.options.<name>`` checked against the learner's keyword arguments."""
    cls = LEARNERS.get(name)
    params = inspect.signature(cls.__init__).parameters
    known = [p for p, v in params.items() if p not in ("self", "top", "device") and v.kind == v.KEYWORD_ONLY]
    unknown = [k for k in options if k not in known]
    if unknown:
        raise UserError(
            f"continual.options.{name}: unknown option(s) {', '.join(unknown)} for method {name!r}; "
            f"known: {', '.join(known) or 'none'}"
        )
    return dict(options)


def build_learner(method: str, top: Config, device: torch.device) -> Learner:
    """The learner ``method`` with its ``continual.options``; one refused in this scenario says why in one line."""
    cls = LEARNERS.get(method)
    scenario = top.continual.scenario
    if scenario not in cls.scenarios:
        raise UserError(
            f"continual method {method!r} cannot run continual.scenario: {scenario} ({cls.scenario_reason}); it runs "
            f"in {', '.join(cls.scenarios)}; remove it from continual.methods or change the scenario"
        )
    return cls(top, device, **learner_options(method, top.continual.options.get(method) or {}))


class ColumnLearner(Learner):
    """A column (an encoder) per task: ``progressive`` (laterals on) or ``independent`` (laterals off)."""

    scenarios = ("task",)
    scenario_reason = "a column per task needs the task identity at test time"

    def __init__(self, top: Config, device: torch.device, lateral: bool = True) -> None:
        super().__init__(top, device)
        c = top.continual
        self.net = ProgressiveNet(alpha=c.alpha, lateral=lateral, adapter_channels=c.adapter_channels)
        self.previous: Optional[nn.Module] = None

    def train_model(self, k: int, st: Any) -> nn.Module:
        encoder = config_encoder(st.cfg)
        if self.top.continual.column_init == "previous" and self.previous is not None:
            encoder.load_state_dict(self.previous.state_dict())
        self.net.add_column(st.name, pooled_head(st.cfg, st.name, st.task, encoder.out_dim), encoder=encoder)
        self.previous = encoder  # the column's stages are this encoder's modules: it holds the trained weights
        self.net.to(self.device)
        return self.net.view(st.name)

    def eval_model(self, j: int, st: Any) -> nn.Module:
        return self.net.view(st.name)

    def added_parameters(self, k: int, st: Any) -> int:
        return self.net.column_parameters(st.name)["total"]


@LEARNERS.register("progressive")
class Progressive(ColumnLearner):
    """Progressive neural networks (Rusu et al. 2016, arXiv:1606.04671, eq. 1 / eq. 2 with adapters): a new column
    per task, every earlier column frozen, each layer of the new column also reading the previous layer of all
    earlier columns through lateral adapters."""

    def __init__(self, top: Config, device: torch.device) -> None:
        super().__init__(top, device, lateral=True)


@LEARNERS.register("independent")
class Independent(ColumnLearner):
    """Independent columns (Rusu et al. 2016's baseline 1): a fresh column per task and no laterals."""

    def __init__(self, top: Config, device: torch.device) -> None:
        super().__init__(top, device, lateral=False)


class SharedEncoderLearner(Learner):
    """One encoder trained through the sequence, with the scenario's heads: a head per task (``task``; earlier
    heads frozen), one head growing by each task's classes (``class``) or one head for every task (``domain``)."""

    def __init__(self, top: Config, device: torch.device, freeze_after_first: bool = False) -> None:
        super().__init__(top, device)
        self.freeze_after_first = freeze_after_first
        self.encoder: Optional[nn.Module] = None
        self.heads: Dict[str, nn.Module] = {}
        self.offsets: Dict[str, int] = {}  # class-incremental: where each task's classes start in the one head
        self.classes_seen = 0

    def train_model(self, k: int, st: Any) -> nn.Module:
        if self.encoder is None:
            self.encoder = config_encoder(st.cfg).to(self.device)
            apply_freeze(self.encoder, st.cfg.model.freeze)
        elif self.freeze_after_first:
            apply_freeze(self.encoder, "all")
        if self.scenario == "task":
            for head in self.heads.values():  # earlier heads keep what they learnt; only the encoder may drift
                head.requires_grad_(False)
        if self.scenario != "domain" or not self.heads:
            self.offsets[st.name] = self.classes_seen
            self.classes_seen += int(st.task.out_dim)
            self.heads[st.name] = pooled_head(st.cfg, st.name, st.task, self.encoder.out_dim).to(self.device)
        return self.model_for(st.name)

    def head_for(self, name: str) -> nn.Module:
        """The head that predicts task ``name`` now."""
        if self.scenario == "class":
            return ConcatHeads(list(self.heads.values()))
        return self.heads[name] if self.scenario == "task" else next(iter(self.heads.values()))

    def model_for(self, name: str) -> TransferModel:
        return TransferModel(self.encoder, {name: self.head_for(name)})

    def eval_model(self, j: int, st: Any) -> nn.Module:
        return self.model_for(st.name)

    def task(self, j: int, st: Any) -> Task:
        return ClassIncrementalTask(st.task, self.offsets[st.name]) if self.scenario == "class" else st.task

    def added_parameters(self, k: int, st: Any) -> int:
        head = sum(p.numel() for p in self.heads[st.name].parameters()) if st.name in self.heads else 0
        return head + (sum(p.numel() for p in self.encoder.parameters()) if k == 0 else 0)


@LEARNERS.register("finetune")
class FineTune(SharedEncoderLearner):
    """Fine-tuning (the lower bound of every continual-learning comparison): one network trained on each task in
    turn with the plain task loss, nothing to prevent forgetting."""

    def __init__(self, top: Config, device: torch.device) -> None:
        super().__init__(top, device)


@LEARNERS.register("head_only")
class HeadOnly(SharedEncoderLearner):
    """A fixed feature extractor: the encoder is trained on the first task only, then frozen; later tasks train
    their heads (Rusu et al. 2016's baseline 2 without fine-tuning)."""

    def __init__(self, top: Config, device: torch.device) -> None:
        super().__init__(top, device, freeze_after_first=True)
