"""The bilevel hook: what a bilevel (meta-learned) weighting sees of one training step.

Before each training step the trainer hands a weighting with ``bilevel = True`` a :class:`MetaProblem` through
``weighting.meta_step(problem)``: this step's training batch, a meta batch, the model's trainable parameters and
the optimizer's virtual step. The method evaluates the model at parameters of its choosing (a virtual step, a
perturbation) with :meth:`MetaProblem.losses` and differentiates with :meth:`MetaProblem.grad`, then updates its
own state (buffers). Nothing here changes the model, its buffers, the optimizer or the global random state:

- every forward is ``torch.func.functional_call`` on a dict of parameters, with copies of the model's buffers, so
  BatchNorm normalises with the batch's statistics (training mode) but its running statistics stay as they are;
- every forward starts from the random state the step started with, so dropout draws the same masks in each of
  them (a finite difference compares like with like) and the step's own forward draws them once more;
- forwards run in float32 (no autocast): finite differences of bf16 losses would be mostly rounding.

Under torchrun each process holds its share of both global batches; the loss values and the gradients returned
are averages over processes, so every process computes the same update.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mtl.core import distributed as dist
from mtl.core.errors import UserError

Batch = Tuple[Tensor, Mapping[str, Tensor]]  # (images, {task: targets}) on the device


class MetaProblem:
    """One step's bilevel problem over ``model``'s trainable parameters (those in ``optimizer``'s groups).

    ``losses`` maps task names, in the weighting's order, to ``fn(output, target) -> scalar loss``. ``train`` is the
    step's batch, ``meta`` the batch of the outer (meta) objective. ``l2sp`` (optional) adds its penalty's gradient
    to the virtual step, as the optimizer's weight decay is added. Use as a context manager: leaving it restores the
    random state the step started with.
    """

    def __init__(
        self,
        model: nn.Module,
        losses: Mapping[str, Callable[[Tensor, Tensor], Tensor]],
        optimizer: torch.optim.Optimizer,
        train: Batch,
        meta: Batch,
        l2sp: Any = None,
    ) -> None:
        self.model, self.loss_fns, self.optimizer = model, dict(losses), optimizer
        self.batches = {"train": train, "meta": meta}
        self.l2sp = l2sp
        names = {id(p): n for n, p in model.named_parameters()}
        self.groups: Dict[str, Dict[str, Any]] = {}  # parameter name -> its optimizer group
        self.params: Dict[str, Tensor] = {}  # the trainable parameters theta (the model's own tensors)
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.requires_grad and id(p) in names:
                    self.params[names[id(p)]] = p
                    self.groups[names[id(p)]] = group
        if not self.params:
            raise UserError(
                "a bilevel weighting needs trainable model parameters, but the optimizer trains none of them; "
                "unfreeze part of the model or use another weighting"
            )
        self.device = next(iter(self.params.values())).device
        self._rng = _rng_state(self.device)

    def __enter__(self) -> "MetaProblem":
        return self

    def __exit__(self, *exc: Any) -> None:
        _set_rng_state(self._rng, self.device)

    def losses(self, params: Mapping[str, Tensor], batch: str = "train") -> Tensor:
        """(T,) task losses of the model at ``params`` (name -> tensor; parameters left out keep their values) on
        the ``"train"`` or ``"meta"`` batch, in training mode. Under torchrun the values are the global batch's
        (the gradient flows to this process's share, as in the trainer's step)."""
        x, targets = self.batches[batch]
        buffers = {n: b.clone() for n, b in self.model.named_buffers()}  # BatchNorm updates the copies
        _set_rng_state(self._rng, self.device)
        with torch.autocast(self.device.type, enabled=False):
            outputs = functional_call(self.model, {**buffers, **params}, (x,))
        each = torch.stack([fn(outputs[t], targets[t]) for t, fn in self.loss_fns.items()])
        return dist.global_mean(each)

    def grad(self, total: Tensor, params: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """``d total / d params`` (zeros where ``total`` does not depend on one), averaged over processes."""
        keys = list(params)
        grads = torch.autograd.grad(total, [params[k] for k in keys], allow_unused=True)
        out = {k: g if g is not None else torch.zeros_like(params[k]) for k, g in zip(keys, grads)}
        dist.all_reduce_mean_(out.values())
        return out

    def step_sizes(self) -> Dict[str, float]:
        """Each trainable parameter's learning rate now (its optimizer group's ``lr``)."""
        return {n: float(g["lr"]) for n, g in self.groups.items()}

    def virtual_step(self, grads: Mapping[str, Tensor]) -> Dict[str, Tensor]:
        """``theta' = theta - lr * (momentum * buffer + grad + weight_decay * theta)`` per parameter, with its
        group's settings and the optimizer's momentum buffer where it has one (SGD): the step the authors of
        Auto-Lambda take (no dampening or Nesterov term; for Adam a plain gradient step). With L2-SP its penalty's
        gradient joins ``grad``. The result is detached and requires grad: the outer objective is differentiated
        with respect to it."""
        extra = self._l2sp_grads()
        out = {}
        with torch.no_grad():
            for n, p in self.params.items():
                group = self.groups[n]
                direction = grads[n] + float(group.get("weight_decay", 0.0)) * p
                if n in extra:
                    direction = direction + extra[n]
                buffer = self.optimizer.state.get(p, {}).get("momentum_buffer")
                if buffer is not None and group.get("momentum", 0.0):
                    direction = direction + float(group["momentum"]) * buffer
                out[n] = (p - float(group["lr"]) * direction).requires_grad_()
        return out

    def _l2sp_grads(self) -> Dict[str, Tensor]:
        if self.l2sp is None:
            return {}
        penalty = self.l2sp.penalty()
        if not penalty.requires_grad:
            return {}
        names = list(self.params)
        grads = torch.autograd.grad(penalty, [self.params[n] for n in names], allow_unused=True)
        return {n: g for n, g in zip(names, grads) if g is not None}


def finite_difference_hypergradient(
    problem: MetaProblem, direction: Mapping[str, Tensor], radius: float = 0.01
) -> Tensor:
    """``(L(theta + eps v) - L(theta - eps v)) / (2 eps)`` per task on the train batch, ``eps = radius / ||v||``:
    the directional derivative ``v . grad L_t(theta)`` to O(eps^2) (DARTS' central difference). (T,), zeros when
    ``v`` is zero. ``direction`` maps parameter names to ``v``."""
    theta = problem.params
    keys = list(direction)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(direction[k]) for k in keys]))
    eps = radius / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    with torch.no_grad():
        plus = problem.losses({k: theta[k] + eps * direction[k] for k in keys})
        minus = problem.losses({k: theta[k] - eps * direction[k] for k in keys})
        return torch.where(norm == 0, torch.zeros_like(plus), (plus - minus) / (2 * eps))


def _rng_state(device: torch.device) -> Tuple[Tensor, Optional[Tensor]]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: Tuple[Tensor, Optional[Tensor]], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)
