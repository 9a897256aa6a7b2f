"""Optimizers, parameter groups and learning-rate schedules."""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from mtl.config.schema import OptimCfg, SchedCfg
from mtl.core.registry import Registry

OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


@OPTIMIZERS.register("sgd")
def _sgd(groups: List[Dict[str, Any]], cfg: OptimCfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **_fused(groups))


@OPTIMIZERS.register("adam")
def _adam(groups: List[Dict[str, Any]], cfg: OptimCfg) -> torch.optim.Optimizer:
    return torch.optim.Adam(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_fused(groups))


@OPTIMIZERS.register("adamw")
def _adamw(groups: List[Dict[str, Any]], cfg: OptimCfg) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), **_fused(groups))


def _fused(groups: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``fused=True`` (one kernel for all parameters) when every parameter is a float tensor on a GPU."""
    params = [p for g in groups for p in g["params"]]
    on_gpu = params and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if on_gpu and "fused" in inspect.signature(torch.optim.SGD).parameters else {}


def lr_mult_of(name: str, lr_mult: Dict[str, float]) -> float:
    """The multiplier of the longest ``lr_mult`` key that is ``name`` or a dotted prefix of it."""
    best: Tuple[int, float] = (-1, 1.0)
    for prefix, mult in lr_mult.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[0]:
            best = (len(prefix), mult)
    return best[1]


def param_groups(
    named_params: Iterable[Tuple[str, nn.Parameter]],
    cfg: OptimCfg,
    extra_mult: float = 1.0,
    scales: Optional[Mapping[int, float]] = None,
) -> List[Dict[str, Any]]:
    """Group trainable parameters by (lr multiplier, weight decay); norms and biases get no decay. A parameter's
    multiplier is its ``lr_mult`` times ``extra_mult`` times its layer scale in ``scales`` (by ``id``; 1 if absent,
    see ``mtl.models.layer_depth``)."""
    groups: Dict[Tuple[float, float], Dict[str, Any]] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        mult = lr_mult_of(name, cfg.lr_mult) * extra_mult * (scales or {}).get(id(p), 1.0)
        decay = 0.0 if (cfg.no_decay_norm_bias and p.ndim <= 1) else cfg.weight_decay
        group = groups.setdefault(
            (mult, decay),
            {
                "params": [],
                "lr": cfg.lr * mult,
                "initial_lr": cfg.lr * mult,
                "weight_decay": decay,
                "lr_mult": mult,
                "name": f"lr x{mult:g}" + (", no decay" if decay == 0 and cfg.weight_decay else ""),
            },
        )
        group["params"].append(p)
    return list(groups.values())


def build_optimizer(
    model: nn.Module, cfg: OptimCfg, scales: Optional[Mapping[int, float]] = None
) -> torch.optim.Optimizer:
    """The configured optimizer over the model's trainable parameters only (``scales``: layer-wise lr scales)."""
    return OPTIMIZERS.get(cfg.name)(param_groups(model.named_parameters(), cfg, scales=scales), cfg)


@SCHEDULES.register("step")
def _step(cfg: SchedCfg, epoch: int, t: float, epochs: int) -> float:
    return cfg.gamma ** (epoch // cfg.step_size)


@SCHEDULES.register("multistep")
def _multistep(cfg: SchedCfg, epoch: int, t: float, epochs: int) -> float:
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("cosine")
def _cosine(cfg: SchedCfg, epoch: int, t: float, epochs: int) -> float:
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t / epochs, 1.0)))


@SCHEDULES.register("onecycle")
def _onecycle(cfg: SchedCfg, epoch: int, t: float, epochs: int) -> float:
    # torch's OneCycleLR curve (cosine annealing, two phases) as a factor of the peak lr (optim.lr).
    lo, end = 1 / cfg.div_factor, 1 / (cfg.div_factor * cfg.final_div_factor)
    up = cfg.pct_start * epochs
    if t < up:
        a, b, frac = lo, 1.0, t / up
    else:
        a, b, frac = 1.0, end, min((t - up) / max(epochs - up, 1e-8), 1.0)
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * frac))


@SCHEDULES.register("constant")
def _constant(cfg: SchedCfg, epoch: int, t: float, epochs: int) -> float:
    return 1.0


def lr_factor(
    cfg: SchedCfg, epochs: int, steps_per_epoch: int, total_steps: Optional[int] = None
) -> Callable[[int], float]:
    """The schedule as a function of the global step: the factor applied to each group's base lr. It spans
    ``epochs`` epochs, or with a step budget (``train.steps``) ``total_steps`` steps, ``total_steps /
    steps_per_epoch`` (fractional) epochs: cosine reaches its end, onecycle its peak at ``pct_start``, of those
    steps; step, multistep and warmup still count epochs of ``steps_per_epoch`` steps."""
    schedule = SCHEDULES.get(cfg.name)
    warmup_steps = cfg.warmup_epochs * steps_per_epoch
    length = total_steps / steps_per_epoch if total_steps is not None else epochs

    def factor(step: int) -> float:
        f = schedule(cfg, step // steps_per_epoch, step / steps_per_epoch, length)
        if warmup_steps > 0 and step < warmup_steps:
            f *= (step + 1) / warmup_steps
        return f

    return factor


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    cfg: SchedCfg,
    epochs: int,
    steps_per_epoch: int,
    total_steps: Optional[int] = None,
) -> LambdaLR:
    """A per-iteration ``LambdaLR``; every schedule is a factor so groups added later follow it (``total_steps``: the
    length of a step budget, see ``lr_factor``)."""
    return LambdaLR(optimizer, lr_factor(cfg, epochs, max(steps_per_epoch, 1), total_steps))


def add_param_group(
    optimizer: torch.optim.Optimizer, scheduler: Optional[LambdaLR], groups: List[Dict[str, Any]]
) -> None:
    """Add groups mid-run so that they follow the scheduler from its current step on."""
    for group in groups:
        base = group["initial_lr"]
        if scheduler is not None:
            fn = scheduler.lr_lambdas[0]
            scheduler.base_lrs.append(base)
            scheduler.lr_lambdas.append(fn)
            group["lr"] = base * fn(scheduler.last_epoch)
            if hasattr(scheduler, "_last_lr"):
                scheduler._last_lr.append(group["lr"])
        optimizer.add_param_group(group)
