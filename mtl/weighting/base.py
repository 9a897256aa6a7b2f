"""The weighting contract: how per-task losses (loss level) or per-task gradients (gradient level) become one update."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.core.registry import Registry

WEIGHTINGS = Registry("weighting")


class Weighting(nn.Module):
    """Base of every method; an ``nn.Module`` so that learnable weights and running state are checkpointed.

    ``tasks`` are the task names in a fixed order; per-task tensors below are ``(T,)`` in that order.
    ``task_weights`` are the config's static ``tasks.<t>.weight`` values (methods may ignore them).
    ``last_weights`` (buffer, ``(T,)``) holds the weights of the latest step, for logging: a loss-level method's
    loss weights, a gradient-level method's coefficients of its update in the task gradients
    (``d = sum_i last_weights_i g_i``), which for PCGrad, GradVac and CAGrad differ from the heads' ``w`` (GradDrop's
    update is no such combination: it logs ones).
    """

    gradient_level: bool = False
    # independent training batches per step: a gradient-level method with samples = S > 1 (MoDo, SDMGrad) gets the
    # task gradients and losses of S consecutive batches at once (see GradientWeighting.forward)
    samples: int = 1
    # True when the total loss is an affine function of the task losses whose coefficients stay fixed within an
    # update, so that train.accumulate's summed gradients of several batches equal one larger batch's
    accumulable: bool = False

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.register_buffer(
            "task_weights", torch.tensor(list(task_weights or [1.0] * len(self.tasks)), dtype=torch.float32)
        )
        self.register_buffer("last_weights", torch.ones(len(self.tasks)))
        self.seed = 0  # the run's seed (train.seed), set by the experiment
        self._draws = 0  # random draws so far; checkpointed, so a resumed run draws what it would have

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def generator(self) -> torch.Generator:
        """A CPU generator for one step's random choices (PCGrad's task order, RLW's weights), seeded by the run's
        seed and the number of draws so far: every process under torchrun draws the same, whatever else consumed
        its global RNG (data augmentation, dropout), and no draw syncs a GPU with the host."""
        self._draws += 1
        return torch.Generator().manual_seed(self.seed * 1_000_003 + self._draws)

    # Python-int counters checkpointed as extra state ({key: attribute}); subclasses add theirs (a step or epoch
    # count kept on the host, so that no training step reads it from the device)
    counters: Dict[str, str] = {"draws": "_draws"}

    def get_extra_state(self) -> Any:
        return {key: getattr(self, attr) for key, attr in self.counters.items()}

    def set_extra_state(self, state: Any) -> None:
        for key, attr in self.counters.items():
            setattr(self, attr, int(state.get(key, 0)) if isinstance(state, dict) else 0)

    def end_epoch(self, mean_losses: Tensor) -> None:
        """Called after each training epoch with the epoch's mean loss per task (DWA uses it)."""

    # True for bilevel (meta-learned) methods: before each training step the trainer calls ``meta_step`` with a
    # ``mtl.weighting.bilevel.MetaProblem`` (the step's batch, a meta batch from an independent reshuffle of the
    # training split, the trainable parameters, the optimizer's virtual step)
    bilevel: bool = False

    def meta_step(self, problem: Any) -> None:  # pragma: no cover - abstract
        """Bilevel methods: update the method's own state (buffers) from ``problem``, on training steps only."""
        raise NotImplementedError


class LossWeighting(Weighting):
    """Combines the task losses into the scalar that is backpropagated."""

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:  # pragma: no cover - abstract
        """``losses``: (T,) float32 with grad. ``shared``: the trainable shared parameters, in module order
        (GradNorm takes the last weight matrix). Returns the total loss; sets ``last_weights``."""
        raise NotImplementedError


class GradientWeighting(Weighting):
    """Combines per-task gradients of the shared part into one gradient."""

    gradient_level = True
    # True when ``d`` combines running averages of the task gradients (DB-MTL) rather than this step's: then
    # ``last_weights`` are the coefficients on those averages
    from_history: bool = False
    # the ``weighting.grad_on`` modes the method is defined for; the experiment refuses the others in one line that
    # says why (``grad_on_reason``, completing "weighting <name> ...")
    grad_on_modes: Tuple[str, ...] = ("params", "representation")
    grad_on_reason: str = ""
    # True when :meth:`forward` needs the shared representation itself (GradDrop: the signs of the activations); with
    # grad_on=representation the trainer sets ``representation`` before each call: the detached feature tensors
    # (batch first) whose flattened gradients are the columns of ``grads``, in that order
    needs_representation: bool = False

    def transform_losses(self, losses: List[Tensor]) -> List[Tensor]:
        """The per-task objectives whose gradients :meth:`forward` balances, from the task losses (each a scalar with
        grad), on training steps only; by default the losses themselves. A method that learns parameters of its
        own from these objectives (IMTL's loss scales) sets their ``.grad`` here: the trainer differentiates the
        returned objectives only with respect to the model."""
        return losses

    def forward(self, grads: Tensor, losses: Tensor) -> Tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        """``grads``: (T, D) float32, row t = gradient of task t's loss w.r.t. the shared parameters (or the
        shared representation), flattened. ``losses``: (T,) detached. Returns ``(d, w)``: the combined
        gradient (D,) used for the shared part, and (T,) weights for the task-specific parts (heads), which
        are trained with ``sum(w * losses)``. Sets ``last_weights`` to the coefficients of ``d`` in the rows of
        ``grads``. Must not sync with the host.

        With ``samples = S > 1``: ``grads`` (S, T, D) and ``losses`` (S, T), one row block per batch; ``d`` and ``w``
        then refer to the last batch (``d = sum_t last_weights_t grads[-1, t]``, heads trained on its losses)."""
        raise NotImplementedError


def build_weighting(
    name: str, tasks: Sequence[str], task_weights: Sequence[float] | None = None, **options: Any
) -> Weighting:
    """A registered method; unknown options are a UserError naming the known ones."""

    cls = WEIGHTINGS.get(name)
    known = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "tasks", "task_weights")]
    for key in options:
        if key not in known:
            raise UserError(
                f"unknown option weighting.options.{key} for weighting {name!r}; known: {', '.join(known) or 'none'}"
            )
    return cls(tasks, task_weights, **options)
