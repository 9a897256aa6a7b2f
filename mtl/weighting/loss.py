"""Loss-level weighting methods: each turns the (T,) task losses into the scalar that is backpropagated.

Convention for every method here: ``last_weights[t]`` is the effective weight of task t's loss in the
returned total, i.e. ``d total / d L_t`` at this step (detached). Methods only advance their running state
(GradNorm, FAMO) on training steps, i.e. when grad is enabled and ``losses`` requires grad.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from mtl.core import distributed as dist
from mtl.core.errors import UserError
from mtl.weighting.base import WEIGHTINGS, LossWeighting
from mtl.weighting.bilevel import MetaProblem, finite_difference_hypergradient


def _is_train_step(losses: Tensor) -> bool:
    return torch.is_grad_enabled() and losses.requires_grad


@WEIGHTINGS.register("equal")
class Equal(LossWeighting):
    """``total = sum_t L_t``; weights are ones."""

    accumulable = True

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        self.last_weights.fill_(1.0)
        return losses.sum()


@WEIGHTINGS.register("static")
class Static(LossWeighting):
    """``total = sum_t w_t L_t`` with the config's fixed ``tasks.<t>.weight`` values."""

    accumulable = True

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        self.last_weights.copy_(self.task_weights)
        return (self.task_weights * losses).sum()


@WEIGHTINGS.register("uncertainty")
class Uncertainty(LossWeighting):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018).

    Learnable log-variances ``s_t = log sigma_t^2`` (init 0), trained by the main optimizer:
    ``total = sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t`` (the paper's regression form, used for every task
    type; its minimum over s_t is at ``exp(s_t) = L_t``). Weights are ``0.5 * exp(-s_t)``.
    """

    accumulable = True

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None) -> None:
        super().__init__(tasks, task_weights)
        self.log_vars = nn.Parameter(torch.zeros(self.num_tasks))

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        weights = 0.5 * torch.exp(-self.log_vars)
        self.last_weights.copy_(weights.detach())
        return (weights * losses + 0.5 * self.log_vars).sum()


@WEIGHTINGS.register("dwa")
class DWA(LossWeighting):
    """Dynamic Weight Average (Liu, Johns & Davison, CVPR 2019).

    ``w = T * softmax(r / temperature)`` with ``r_t = L_t(e-1) / L_t(e-2)`` from the epoch mean losses fed
    to :meth:`end_epoch`; ones until two epochs have been seen.
    """

    accumulable = True

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, temperature: float = 2.0
    ) -> None:
        super().__init__(tasks, task_weights)
        if temperature <= 0:
            raise UserError(f"weighting.options.temperature must be > 0 for dwa, got {temperature}")
        self.temperature = float(temperature)
        self.register_buffer("loss_history", torch.ones(2, self.num_tasks))  # rows: epoch e-2, e-1
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.long))

    def end_epoch(self, mean_losses: Tensor) -> None:
        self.loss_history[0].copy_(self.loss_history[1])
        self.loss_history[1].copy_(mean_losses.detach())
        self.epochs_seen.add_(1)

    def weights(self) -> Tensor:
        ratio = self.loss_history[1] / self.loss_history[0].clamp_min(1e-12)
        dynamic = self.num_tasks * torch.softmax(ratio / self.temperature, dim=0)
        return torch.where(self.epochs_seen >= 2, dynamic, torch.ones_like(dynamic))

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        weights = self.weights()
        self.last_weights.copy_(weights)
        return (weights * losses).sum()


@WEIGHTINGS.register("gradnorm")
class GradNorm(LossWeighting):
    """GradNorm (Chen et al., ICML 2018).

    Weights ``w`` (buffer, init ones) give ``total = sum_t w_t L_t``. Each training step, with
    ``G_t = w_t * ||d L_t / d W||`` on the last shared weight tensor ``W`` (last of ``shared`` with
    ndim >= 2), ``r_t = (L_t/L_t(0)) / mean(L/L(0))`` and the target ``mean(G) * r_t^alpha`` held constant,
    ``w`` takes one plain gradient step of size ``lr`` on ``sum_t |G_t - target_t|`` (gradient
    ``sign(G_t - target_t) * ||d L_t / d W||``, analytic, no double backward), is clamped positive and
    renormalised to sum to T. The total uses the weights from before the update.
    """

    def __init__(
        self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, alpha: float = 1.5, lr: float = 0.025
    ) -> None:
        super().__init__(tasks, task_weights)
        self.alpha = float(alpha)
        self.lr = float(lr)
        self.register_buffer("loss_weights", torch.ones(self.num_tasks))
        self.register_buffer("initial_losses", torch.ones(self.num_tasks))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    @staticmethod
    def _last_weight(shared: Sequence[Tensor]) -> Tensor:
        params = list(shared)
        if not params:
            raise UserError(
                "GradNorm needs trainable shared parameters (the encoder is frozen or empty); "
                "unfreeze part of the encoder or use another weighting"
            )
        matrices = [p for p in params if p.ndim >= 2]
        return (matrices or params)[-1]

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        weight = self._last_weight(shared)
        weights = self.loss_weights.clone()
        self.last_weights.copy_(weights)
        total = (weights * losses).sum()
        if _is_train_step(losses):
            self._update(losses, weight)
        return total

    def _update(self, losses: Tensor, weight: Tensor) -> None:
        grads = []
        for t in range(self.num_tasks):
            (grad,) = torch.autograd.grad(losses[t], weight, retain_graph=True, allow_unused=True)
            grads.append(grad.detach().float() if grad is not None else torch.zeros_like(weight, dtype=torch.float32))
        grads_t = torch.stack(grads)
        dist.all_reduce_mean_([grads_t])  # under torchrun: the global batch's gradients, so weights agree everywhere
        raw_norms = grads_t.flatten(1).norm(dim=1)  # ||d L_t / d W||
        current = losses.detach()
        self.initial_losses.copy_(torch.where(self.initialized, self.initial_losses, current))
        self.initialized.fill_(True)
        w = self.loss_weights
        grad_norms = w * raw_norms
        ratio = current / self.initial_losses.clamp_min(1e-12)
        relative = ratio / ratio.mean().clamp_min(1e-12)
        target = grad_norms.mean() * relative.pow(self.alpha)
        new_w = (w - self.lr * torch.sign(grad_norms - target) * raw_norms).clamp_min(1e-6)
        self.loss_weights.copy_(self.num_tasks * new_w / new_w.sum())


@WEIGHTINGS.register("rlw")
class RLW(LossWeighting):
    """Random Loss Weighting (Lin et al., TMLR 2022).

    Each training step ``w = T * softmax(n)``, ``n ~ N(0, I)`` drawn from the method's generator (the same on
    every process); ``total = sum_t w_t L_t`` (evaluation: ``w = 1``). Weights sum to T (the paper's sum to 1,
    times T so that the scale matches ``equal``).
    """

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        if not _is_train_step(losses):  # evaluation: equal weights, and no draw (processes see unequal val batches)
            return losses.sum()
        noise = torch.randn(self.num_tasks, generator=self.generator()).to(losses.device, losses.dtype)
        weights = self.num_tasks * torch.softmax(noise, dim=0)
        self.last_weights.copy_(weights)
        return (weights * losses).sum()


@WEIGHTINGS.register("geometric_mean")
class GeometricMean(LossWeighting):
    """Geometric loss strategy (Chennupati et al., CVPR-W 2019): ``total = (prod_t L_t)^(1/T)``.

    Computed as ``exp(mean(log(max(L, eps))))``. Its gradient weights are ``total / (T * L_t)``.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, eps: float = 1e-8) -> None:
        super().__init__(tasks, task_weights)
        self.eps = float(eps)

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        clamped = losses.clamp_min(self.eps)
        total = torch.exp(torch.log(clamped).mean())
        self.last_weights.copy_((total / (self.num_tasks * clamped)).detach())
        return total


@WEIGHTINGS.register("famo")
class FAMO(LossWeighting):
    """Fast Adaptive Multitask Optimization (Liu et al., NeurIPS 2023).

    With ``D_t = max(L_t - min_t, 0) + eps``, ``z = softmax(xi)`` and ``c = sum_t z_t / D_t`` (detached):
    ``total = sum_t z_t * log(D_t) / c``, whose gradient weights ``(z_t / D_t) / c`` sum to 1 (the paper's
    scale). The logits ``xi`` follow the paper: gradient ``J_softmax(xi)^T delta + gamma * xi`` with
    ``delta_t = log D_t(before) - log D_t(after)``, stepped by Adam (lr ``lr``, betas 0.9/0.999, as in
    the authors' code; ``gamma`` acts as L2 weight decay).

    One-step-lag approximation: the paper measures the losses again on the same batch after the
    optimizer step (an extra forward). Here ``delta`` uses this step's losses as the "after" of the
    previous step (another batch), so ``xi`` is updated at the start of each forward from the previous
    and current losses, and the first step makes no update.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        gamma: float = 1e-3,
        lr: float = 0.025,
        min_losses: float | Sequence[float] = 0.0,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(tasks, task_weights)
        self.gamma, self.lr, self.eps = float(gamma), float(lr), float(eps)
        self.betas = (0.9, 0.999)
        mins = torch.as_tensor(min_losses, dtype=torch.float32)
        if mins.ndim > 1 or (mins.ndim == 1 and mins.numel() != self.num_tasks):
            raise UserError(
                f"weighting.options.min_losses for famo must be a number or a list of {self.num_tasks} numbers"
            )
        self.register_buffer("min_losses", mins.expand(self.num_tasks).clone())
        self.register_buffer("logits", torch.zeros(self.num_tasks))
        self.register_buffer("prev_losses", torch.ones(self.num_tasks))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("exp_avg", torch.zeros(self.num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(self.num_tasks))
        self.register_buffer("adam_step", torch.zeros(()))

    def _shifted(self, losses: Tensor) -> Tensor:
        return (losses - self.min_losses).clamp_min(0.0) + self.eps

    def _update_logits(self, current: Tensor) -> None:
        z = torch.softmax(self.logits, dim=0)
        delta = torch.log(self._shifted(self.prev_losses)) - torch.log(self._shifted(current))
        grad = z * (delta - (z * delta).sum()) + self.gamma * self.logits  # softmax Jacobian^T delta
        beta1, beta2 = self.betas
        step = self.adam_step + 1
        exp_avg = beta1 * self.exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * self.exp_avg_sq + (1 - beta2) * grad * grad
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + 1e-8
        logits = self.logits - self.lr * (exp_avg / (1 - beta1**step)) / denom
        keep = self.has_prev
        self.logits.copy_(torch.where(keep, logits, self.logits))
        self.exp_avg.copy_(torch.where(keep, exp_avg, self.exp_avg))
        self.exp_avg_sq.copy_(torch.where(keep, exp_avg_sq, self.exp_avg_sq))
        self.adam_step.copy_(torch.where(keep, step, self.adam_step))

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        train = _is_train_step(losses)
        if train:
            current = losses.detach()
            self._update_logits(current)
            self.prev_losses.copy_(current)
            self.has_prev.fill_(True)
        z = torch.softmax(self.logits, dim=0)
        shifted = self._shifted(losses)
        c = (z / shifted).sum().detach()
        self.last_weights.copy_((z / shifted.detach()) / c)
        return (z * torch.log(shifted)).sum() / c


def _log_losses(losses: Tensor, eps: float) -> Tensor:
    return torch.log(losses.clamp_min(eps))


@WEIGHTINGS.register("scale_invariant")
class ScaleInvariant(LossWeighting):
    """Scale-invariant loss, the "SI" baseline of Navon et al. (Nash-MTL, ICML 2022, Sec. 6):
    ``total = sum_t log L_t`` (with ``L_t`` clamped to ``eps``).

    Multiplying a task's loss by any constant leaves the update unchanged; the gradient weights are ``1 / L_t``.
    """

    def __init__(self, tasks: Sequence[str], task_weights: Sequence[float] | None = None, eps: float = 1e-8) -> None:
        super().__init__(tasks, task_weights)
        self.eps = float(eps)

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        self.last_weights.copy_(1.0 / losses.detach().clamp_min(self.eps))
        return _log_losses(losses, self.eps).sum()


@WEIGHTINGS.register("stch")
class STCH(ScaleInvariant):
    """Smooth Tchebycheff scalarization (Lin et al., ICML 2024, Eq. 6), in its multitask form (the authors' STCH_MTL
    code, as in LibMTL):

    ``total = T * mu * log sum_t exp(log(L_t / n_t) / mu)``

    with preference ``lambda = 1`` and ideal point 0 in the normalised log losses ``log(L_t / n_t)``. The nadir
    ``n`` is the mean training loss per task over the last of ``warmup_epochs`` epochs, which train on the
    scale-invariant ``sum_t log L_t``. The default 5 matches LibMTL's ``STCH_warmup_epoch=4`` (epochs 0-4); there
    ``n`` averages the batches' losses, here the examples' (equal unless the last batch is smaller). As
    ``mu -> 0`` the total tends to ``T * max_t log(L_t / n_t)``, the Tchebycheff scalarization. Gradient weights:
    ``T * softmax(log(L / n) / mu)_t / L_t``.
    """

    counters = {**ScaleInvariant.counters, "epochs": "_epochs"}

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        mu: float = 1.0,
        warmup_epochs: int = 5,
        eps: float = 1e-20,
    ) -> None:
        super().__init__(tasks, task_weights, eps)
        if mu <= 0:
            raise UserError(f"weighting.options.mu must be > 0 for stch, got {mu}")
        if int(warmup_epochs) != warmup_epochs or warmup_epochs < 1:
            raise UserError(f"weighting.options.warmup_epochs must be an integer >= 1 for stch, got {warmup_epochs}")
        self.mu, self.warmup_epochs = float(mu), int(warmup_epochs)
        self.register_buffer("nadir", torch.ones(self.num_tasks))
        self._epochs = 0  # training epochs seen

    def end_epoch(self, mean_losses: Tensor) -> None:
        self._epochs += 1
        if self._epochs == self.warmup_epochs:
            self.nadir.copy_(mean_losses.detach().to(self.nadir).clamp_min(self.eps))

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        if self._epochs < self.warmup_epochs:
            return super().forward(losses, shared)
        scaled = (_log_losses(losses, self.eps) - torch.log(self.nadir)) / self.mu
        t = self.num_tasks
        self.last_weights.copy_(t * torch.softmax(scaled.detach(), dim=0) / losses.detach().clamp_min(self.eps))
        return t * self.mu * torch.logsumexp(scaled, dim=0)


@WEIGHTINGS.register("auto_lambda")
class AutoLambda(LossWeighting):
    """Auto-Lambda (Liu, James, Davison & Johns, TMLR 2022), as in the authors' code (lorenmt/auto-lambda).

    ``total = sum_t lambda_t L_t``. The weights ``lambda`` (buffer, init ``init``) follow the bilevel problem
    ``min_lambda L_meta(theta - alpha grad_theta sum_t lambda_t L_t(theta; train); meta)`` with
    ``L_meta = sum_{t in primary} L_t`` (every task by default, the multitask setting; a subset is their auxiliary
    learning). Before each training step (:meth:`meta_step`, on this step's batch and a meta batch):

    1. virtual step ``theta' = theta - alpha (mu b + g + wd theta)``, ``g = grad_theta sum_t lambda_t L_t(theta;
       train)``, ``alpha`` each parameter's learning rate (the authors take the first group's for all), ``mu b``
       the SGD momentum term, ``wd`` the weight decay;
    2. ``d = grad_theta' L_meta(theta'; meta)``;
    3. ``dL_meta/dlambda_t = -alpha d . grad_theta L_t(theta; train)``, the dot product taken by the central
       difference ``(L_t(theta + eps alpha d) - L_t(theta - eps alpha d)) / (2 eps)``, ``eps = 0.01 / ||alpha d||``
       (DARTS' approximation of the second-order term; exact for losses quadratic in theta);
    4. one Adam step on ``lambda`` (lr ``lr``, betas 0.9/0.999, eps 1e-8: the authors' meta optimizer). A
       non-finite hypergradient leaves ``lambda`` and Adam's state as they were. ``nonnegative`` clamps ``lambda``
       at 0 (not in the authors' code, which lets weights go negative).

    Defaults are the authors' (``init`` 0.1, ``lr`` 1e-4 for NYUv2; they use 3e-5 on CityScapes). Meta batches: the
    authors draw them from "a copy of train_loader with different data order", and so does the trainer (an
    independent reshuffle of the training split, seeded by ``train.seed`` and the epoch); never the validation
    split that selects results. Each step costs two forward-backward passes and two forwards more than ``static``.
    """

    bilevel = True

    def __init__(
        self,
        tasks: Sequence[str],
        task_weights: Sequence[float] | None = None,
        init: float = 0.1,
        lr: float = 1e-4,
        primary: str | Sequence[str] | None = None,
        nonnegative: bool = False,
    ) -> None:
        super().__init__(tasks, task_weights)
        if not lr > 0:
            raise UserError(f"weighting.options.lr must be > 0 for auto_lambda, got {lr}")
        if not -float("inf") < float(init) < float("inf"):
            raise UserError(f"weighting.options.init must be a finite number for auto_lambda, got {init}")
        chosen = list(self.tasks) if primary is None else [primary] if isinstance(primary, str) else list(primary)
        if not chosen or any(t not in self.tasks for t in chosen):
            raise UserError(
                f"weighting.options.primary for auto_lambda must list tasks among {', '.join(self.tasks)} "
                f"(or be omitted: all of them), got {primary!r}"
            )
        self.lr, self.nonnegative = float(lr), bool(nonnegative)
        self.betas, self.eps = (0.9, 0.999), 1e-8
        self.register_buffer("primary", torch.tensor([float(t in chosen) for t in self.tasks]), persistent=False)
        self.register_buffer("loss_weights", torch.full((self.num_tasks,), float(init)))
        self.register_buffer("exp_avg", torch.zeros(self.num_tasks))
        self.register_buffer("exp_avg_sq", torch.zeros(self.num_tasks))
        self.register_buffer("adam_step", torch.zeros(()))
        self.last_weights.copy_(self.loss_weights)

    def forward(self, losses: Tensor, shared: Sequence[Tensor] = ()) -> Tensor:
        weights = self.loss_weights.clone()
        self.last_weights.copy_(weights)
        return (weights * losses).sum()

    def hypergradient(self, problem: MetaProblem) -> Tensor:
        """(T,) ``dL_meta / dlambda`` by steps 1-3 above."""
        theta = problem.params
        g = problem.grad((self.loss_weights * problem.losses(theta, "train")).sum(), theta)
        virtual = problem.virtual_step(g)
        d = problem.grad((self.primary * problem.losses(virtual, "meta")).sum(), virtual)
        lrs = problem.step_sizes()
        return -finite_difference_hypergradient(problem, {k: lrs[k] * v for k, v in d.items()})

    def meta_step(self, problem: MetaProblem) -> None:
        grad = self.hypergradient(problem).to(self.loss_weights)
        beta1, beta2 = self.betas
        step = self.adam_step + 1
        exp_avg = beta1 * self.exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * self.exp_avg_sq + (1 - beta2) * grad * grad
        denom = (exp_avg_sq / (1 - beta2**step)).sqrt() + self.eps
        weights = self.loss_weights - self.lr * (exp_avg / (1 - beta1**step)) / denom
        if self.nonnegative:
            weights = weights.clamp_min(0.0)
        ok = torch.isfinite(grad).all()
        for buffer, new in ((self.loss_weights, weights), (self.exp_avg, exp_avg), (self.exp_avg_sq, exp_avg_sq)):
            buffer.copy_(torch.where(ok, new, buffer))
        self.adam_step.copy_(torch.where(ok, step, self.adam_step))
