"""Averages of the weights a run trains: an exponential moving average after every update (``train.ema``) and
stochastic weight averaging over epochs (``train.swa``), with SWA's learning rate and BatchNorm recompute."""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Dict, Iterable, Mapping

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from mtl.data.loaders import in_order, reshuffled
from mtl.data.multi_input import MultiInputLoader
from mtl.models.batchnorm import training_modes


def _detached_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose parameters take no gradient (and run uncompiled: a ``compile()``d
    module's copy would otherwise call the original's compiled forward)."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if getattr(module, "_compiled_call_impl", None) is not None:
            module._compiled_call_impl = None
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin.eval()


def ema_decay(update: int, decay: float, warmup: bool) -> float:
    """The decay of EMA update number ``update`` (1, 2, ...), as timm's ``ModelEmaV3.get_decay(step)`` with
    ``update_after_step=0``, ``min_decay=0``, ``warmup_gamma=1``, ``warmup_power=2/3``: the first update copies the
    weights (0); later ones use ``decay``, or with ``warmup`` ``min(decay, 1 - update ** (-2/3))``."""
    if update <= 1:
        return 0.0
    return min(decay, 1.0 - update ** (-2.0 / 3.0)) if warmup else decay


class WeightEMA:
    """An exponential moving average of ``model``'s weights (``train.ema``), timm's ``ModelEmaV3`` as its train.py
    uses it (``model_ema.update(model, step=num_updates)`` after every optimizer update):

        shadow <- d_n * shadow + (1 - d_n) * weights,   d_n = ``ema_decay(n, decay, warmup)`` at update n.

    Like timm's default (``exclude_buffers=False``), floating-point buffers (BatchNorm's running mean and variance)
    are averaged the same way and the others (``num_batches_tracked``) copied. Parameters that do not train at the
    time of an update are left out: they equal the shadow's (frozen from the start, or not yet unfrozen), which the
    rule would keep as they are, so the result is timm's; a module unfrozen later is averaged from then on.
    ``module`` (eval mode) is what gets validated and saved.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9998, warmup: bool = False) -> None:
        self.module = _detached_copy(model)
        self.decay, self.warmup = decay, warmup
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One update from ``model``'s weights now (call after each optimizer step that was taken)."""
        self.updates += 1
        weight = 1.0 - ema_decay(self.updates, self.decay, self.warmup)
        shadow, current = [], []
        for e, p in zip(self.module.parameters(), model.parameters()):
            if p.requires_grad:
                shadow.append(e)
                current.append(p.detach())
        for e, b in zip(self.module.buffers(), model.buffers()):
            if e.is_floating_point():
                shadow.append(e)
                current.append(b.detach())
            else:
                e.copy_(b)
        if shadow:
            torch._foreach_lerp_(shadow, current, weight)

    def state_dict(self) -> Dict[str, Any]:
        return {"model": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.updates = int(state["updates"])

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start again from ``model``'s weights (a resumed run whose checkpoint has no average)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0


class SWA:
    """Stochastic weight averaging (Izmailov et al. 2018, "Averaging Weights Leads to Wider Optima and Better
    Generalization", Algorithm 1 with cycle length 1): the running mean ``w_swa <- (w_swa * n + w) / (n + 1)`` of the
    weights at the end of every epoch from ``start_epoch`` (0-based) on, kept by torch's ``AveragedModel`` (buffers
    follow the trained model's; ``n_averaged`` counts the epochs). Frozen parameters average to themselves.

    At the end ``recompute_bn`` gives the trained BatchNorm layers statistics of the averaged weights (the paper's
    ``bn_update``, ``torch.optim.swa_utils.update_bn``).
    """

    def __init__(self, model: nn.Module, start_epoch: int) -> None:
        self.averaged = AveragedModel(_detached_copy(model))
        self.start_epoch = start_epoch
        self.epochs: list = []  # the 1-based epochs averaged

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @property
    def count(self) -> int:
        return int(self.averaged.n_averaged)

    @torch.no_grad()
    def end_epoch(self, model: nn.Module, epoch: int) -> None:
        """After the training phase of ``epoch`` (0-based): add ``model``'s weights when ``epoch >= start_epoch``."""
        if epoch >= self.start_epoch:
            self.averaged.update_parameters(model)
            self.epochs.append(epoch + 1)

    def state_dict(self) -> Dict[str, Any]:
        return {"averaged": self.averaged.state_dict(), "epochs": list(self.epochs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
        self.epochs = list(state["epochs"])

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        self.module.load_state_dict(model.state_dict())
        self.averaged.n_averaged.zero_()
        self.epochs = []


@torch.no_grad()
def recompute_bn(
    averaged: nn.Module,
    trained: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    forward: Callable[[nn.Module, Mapping[str, Any]], Any],
) -> int:
    """Set the running statistics of ``averaged``'s BatchNorm layers to their cumulative averages over one pass of
    ``forward(averaged, batch)`` for every batch (``momentum=None``: the mean over batches of each batch's mean and
    unbiased variance), as ``torch.optim.swa_utils.update_bn``. The pass runs in training mode as ``trained`` (same
    structure) has it: mtl's models keep frozen parts in eval mode, so only BatchNorm layers that train are
    recomputed and frozen ones keep their statistics. Returns the number of batches (0: no layer to recompute,
    nothing run). ``averaged`` is left in eval mode."""
    modes = training_modes(trained)
    layers = [
        a
        for a, mode in zip(averaged.modules(), modes)
        if mode and isinstance(a, nn.modules.batchnorm._BatchNorm) and a.track_running_stats
    ]
    if not layers:
        return 0
    momenta = {m: m.momentum for m in layers}
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    for a, mode in zip(averaged.modules(), modes):
        a.training = mode
    n = 0
    try:
        for batch in batches:
            forward(averaged, batch)
            n += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        averaged.eval()
    return n


def recompute_bn_on_train(module: nn.Module, trainer: Any) -> int:
    """``recompute_bn`` of ``module`` (shaped as ``trainer.model``, whose training modes pick the layers; ``trainer``
    is the ``engine.trainer.Trainer``, which imports this module) over one pass of its training split as
    ``torch.optim.swa_utils.update_bn`` is given the training loader: with its training transforms, in a shuffled
    order (``training_pass``), fed as the trainer feeds it. Every process makes the whole pass, its order and random
    draws seeded by ``trainer.seed`` alone, so that every process, and a run resumed after an interruption here, gets
    the same statistics. Returns the number of batches."""
    forward = batch_forward(trainer.device, trainer.channels_last, trainer.autocast)
    with torch.random.fork_rng(devices=[trainer.device] if trainer.device.type == "cuda" else []):
        torch.manual_seed(trainer.seed)
        return recompute_bn(module, trainer.model, training_pass(trainer.loaders["train"], trainer.seed), forward)


def training_pass(loader: Any, seed: int) -> Any:
    """Every item of ``loader``'s split once, not sharded over processes, with its augmentation, in an order drawn by
    a generator seeded with ``seed`` (each task's own in a multi-input run). Shuffled as in training: the split in
    order (by class, for image folders) would make batches of one class, whose statistics lack the variance between
    classes that every training batch had."""
    if isinstance(loader, MultiInputLoader):
        parts = loader.loaders.items()
        return MultiInputLoader({t: training_pass(part, seed + i) for i, (t, part) in enumerate(parts)})
    return reshuffled(in_order(loader), torch.Generator().manual_seed(seed))


def swa_lr_lambda(
    factor: Callable[[int], float], start_step: int, anneal_steps: int, lr_ratio: float
) -> Callable[[int], float]:
    """The schedule ``factor`` (of each group's base lr) until ``start_step``, then torch's ``SWALR`` with cosine
    annealing: from the schedule's value at ``start_step`` to ``lr_ratio`` (``swa.lr / optim.lr``, so that each group
    ends at ``swa.lr`` times its lr multiplier) over ``anneal_steps`` steps, constant after. Closed form of SWALR's
    ``lr_t = swa_lr * a(t) + lr_0 * (1 - a(t))``, ``a(t) = (1 - cos(pi * t)) / 2``, ``t = min(1, steps / anneal)``."""
    start = factor(start_step)

    def swa_factor(step: int) -> float:
        if step < start_step:
            return factor(step)
        t = 1.0 if anneal_steps <= 0 else min(1.0, (step - start_step) / anneal_steps)
        alpha = (1.0 - math.cos(math.pi * t)) / 2.0
        return lr_ratio * alpha + start * (1.0 - alpha)

    return swa_factor


def use_swa_lr(scheduler: Any, start_step: int, anneal_steps: int, lr_ratio: float) -> None:
    """Make the per-iteration ``LambdaLR`` ``scheduler`` (``engine.optim.build_scheduler``) follow ``swa_lr_lambda``;
    it stays a pure function of the step, so a resumed run takes the same learning rates."""
    scheduler.lr_lambdas = [swa_lr_lambda(f, start_step, anneal_steps, lr_ratio) for f in scheduler.lr_lambdas]


def batch_forward(device: torch.device, channels_last: bool, autocast: Callable[[], Any]) -> Callable:
    """A ``forward(model, batch)`` for ``recompute_bn`` that feeds a training batch as the trainer does (a
    multi-input batch: every task's images through the model with that task only)."""

    def prepared(x: Tensor) -> Tensor:
        x = x.to(device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.ndim == 4 else x

    def forward(model: nn.Module, batch: Mapping[str, Any]) -> None:
        with autocast():
            if "inputs" in batch:
                for t, part in batch["inputs"].items():
                    model(prepared(part["image"]), tasks=(t,))
            else:
                model(prepared(batch["image"]))

    return forward
