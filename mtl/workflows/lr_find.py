"""The learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", WACV 2017, sec. 3.3;
as fastai's ``lr_find`` and Lightning's ``LearningRateFinder``).

The model, data and optimizer are built as ``mtl train`` builds them (freezing, ``optim.lr_mult``,
``optim.layer_decay``; ``train.unfreeze`` events do not happen: the test trains what trains at the start). The
learning rate grows exponentially, ``lr_k = start * (end / start) ** (k / (steps - 1))`` for steps k = 0..steps-1,
cycling the training loader; the training loss (the sum of the task losses) of every step is recorded and smoothed
by an exponential moving average with bias correction (``beta`` 0.98, as both). The test stops early once the
smoothed loss exceeds 4 times its minimum so far (fastai's ``stop_div``) or is not finite. The suggestion is
Lightning's: the lr where the smoothed loss falls fastest, the minimum of its gradient with respect to log lr,
skipping the first 10 points and the last. The weights it trained are thrown away.
"""

from __future__ import annotations

import math
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
from torch.optim.lr_scheduler import LambdaLR
from tqdm.auto import tqdm

from mtl.build.experiment import build_experiment
from mtl.build.training import build_trainer
from mtl.config.load import config_to_dict
from mtl.config.schema import Config
from mtl.config.stages import select_stage
from mtl.core.checkpoint import save_json, writing
from mtl.core.errors import UserError
from mtl.core.rundir import make_run_dir
from mtl.engine.trainer import Hook, Trainer
from mtl.workflows.plots import have_matplotlib, lr_find_chart

BETA = 0.98  # fastai's and Lightning's smoothing
DIVERGE = 4.0  # fastai's stop_div: the smoothed loss above 4x its minimum
SKIP_BEGIN, SKIP_END = 10, 1  # Lightning's suggestion(skip_begin=10, skip_end=1)


def lr_schedule(start: float, end: float, steps: int) -> List[float]:
    """``start * (end / start) ** (k / (steps - 1))`` for k = 0..steps-1: exactly ``start`` first, ``end`` last."""
    check_range(start, end, steps)
    return [start * (end / start) ** (k / (steps - 1)) for k in range(steps)]


def check_range(start: float, end: float, steps: int) -> None:
    """A one-line UserError unless 0 < start < end (finite) and steps >= 2."""
    if not (0 < start < end < math.inf):
        raise UserError(f"--start-lr and --end-lr must satisfy 0 < start < end, got {start:g} and {end:g}")
    if steps < 2:
        raise UserError(f"--steps must be at least 2 (the lr grows from --start-lr to --end-lr), got {steps}")


def smooth(losses: Sequence[float], beta: float = BETA) -> List[float]:
    """The bias-corrected exponential moving average: ``a_k = beta a_{k-1} + (1 - beta) x_k``, ``a_{-1} = 0``,
    reported as ``a_k / (1 - beta ** (k + 1))``."""
    avg, out = 0.0, []
    for k, x in enumerate(losses):
        avg = beta * avg + (1 - beta) * x
        out.append(avg / (1 - beta ** (k + 1)))
    return out


def diverged(smoothed: Sequence[float], factor: float = DIVERGE) -> bool:
    """Whether the last smoothed loss ends the test: not finite, or above ``factor`` times the minimum before it."""
    last = smoothed[-1]
    if not math.isfinite(last):
        return True
    return len(smoothed) > 1 and last > factor * min(smoothed[:-1])


def suggest(
    lrs: Sequence[float], smoothed: Sequence[float], skip_begin: int = SKIP_BEGIN, skip_end: int = SKIP_END
) -> Optional[int]:
    """The index of the steepest descent of ``smoothed`` against log lr (the minimum of ``np.gradient``, central
    differences inside), among the points left after skipping ``skip_begin`` and ``skip_end``; None with fewer than
    two finite points there."""
    idx = [i for i in range(skip_begin, len(smoothed) - skip_end) if math.isfinite(smoothed[i])]
    if len(idx) < 2:
        return None
    x = np.log(np.asarray([lrs[i] for i in idx], dtype=np.float64))
    y = np.asarray([smoothed[i] for i in idx], dtype=np.float64)
    return idx[int(np.argmin(np.gradient(y, x)))]


class RangeTest(Hook):
    """Records the loss of every step and asks the trainer to stop after ``steps`` steps or when the smoothed loss
    diverges."""

    def __init__(self, steps: int, progress: bool) -> None:
        self.steps = steps
        self.losses: List[float] = []
        self.smoothed: List[float] = []
        self.finished = self.stopped_early = False
        self.bar = tqdm(total=steps, desc="lr-find", leave=False, disable=None if progress else True)

    def after_step(self, trainer: Trainer, losses: Dict[str, Any]) -> None:
        loss = float(sum(v.detach().float() for v in losses.values()))
        self.losses.append(loss)
        self.smoothed = smooth(self.losses)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{self.smoothed[-1]:.4g}")
        self.stopped_early = diverged(self.smoothed) and len(self.losses) < self.steps
        if len(self.losses) >= self.steps or self.stopped_early:
            self.finished = True
            trainer.request_stop()


def pick_stage(top: Config, stages: List[Config], name: Optional[str]) -> Config:
    """The config of stage ``name`` of a staged config (``stages``: its stage configs). Refused in one line: no
    ``name`` (the stages are listed), an unknown one, continual runs, and a stage that starts from an earlier
    stage's trained weights (``weights: stage:<name>``), which the range test would not have."""
    if top.continual.methods or not stages:
        raise UserError(
            "--stage picks a stage of a config with stages (not continual.methods); this config has none to pick"
            if not top.continual.methods
            else "mtl lr-find does not test continual runs (continual.methods); give one task's settings as a config"
        )
    if name is None:
        raise UserError(
            f"this config has stages: name the one to test with --stage ({', '.join(c.name for c in stages)})"
        )
    cfg = select_stage(stages, name)
    weights = cfg.model.weights or ""
    if weights.startswith("stage:"):
        raise UserError(
            f"stage {name!r} starts from stage {weights[6:]!r}'s trained weights, which mtl lr-find does not train; "
            f"test a stage that starts from a weights name, a file or random weights"
        )
    return cfg


def lr_find(
    cfg: Config, start: float = 1e-7, end: float = 10.0, steps: int = 100, quiet: bool = False
) -> Dict[str, Any]:
    """Run the range test for ``cfg`` and write ``<out_dir>/<name>/<time>-lr_find/``: ``lr_find.json`` (lrs, losses,
    smoothed, suggestion), TensorBoard scalars and, with matplotlib, ``lr_find.png``. Returns the json's content
    with ``dir`` and ``plot`` (the PNG's path, or None without matplotlib)."""
    check_range(start, end, steps)
    if cfg.stages or cfg.continual.methods:
        raise UserError(
            "mtl lr-find tests one training config; this one has stages (or continual.methods): pick one with "
            "--stage NAME, or give its settings as a config of its own"
        )
    lrs = lr_schedule(start, end, steps)
    exp = build_experiment(cfg)
    test = RangeTest(steps, cfg.train.progress and not quiet)
    loaders = {"train": exp.loaders["train"]}
    trainer = build_trainer(
        cfg,
        exp.model,
        exp.tasks,
        loaders,
        device=exp.device,
        generator=exp.generator,
        hooks=[test],
        optimized=exp.model,
        weighting=exp.weighting,
        l2sp=exp.l2sp,
        quiet=True,
        grad_on=cfg.weighting.grad_on,
        nonfinite="off",
    )
    trainer.epochs = math.inf  # the hook ends the test; the loader is cycled epoch after epoch
    trainer.steps = None  # and no step budget (train.steps) either
    base = cfg.optim.lr
    trainer.scheduler = LambdaLR(trainer.optimizer, lambda k: lrs[min(k, steps - 1)] / base)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        if not test.finished:  # the user's Ctrl-C, not the hook's stop
            raise
    finally:
        test.bar.close()
    n = len(test.losses)
    best = suggest(lrs[:n], test.smoothed)
    result = {
        "lrs": lrs[:n],
        "losses": test.losses,
        "smoothed": test.smoothed,
        "suggestion": lrs[best] if best is not None else None,
        "suggestion_step": best,
        "stopped_early": test.stopped_early,
        "start_lr": start,
        "end_lr": end,
        "steps": steps,
        "beta": BETA,
        "config": config_to_dict(cfg),
    }
    out = make_run_dir(Path(cfg.out_dir) / cfg.name / (datetime.now().strftime("%Y%m%d-%H%M%S") + "-lr_find"))
    save_json(result, out / "lr_find.json")
    _tensorboard(out, result)
    plot = None
    if have_matplotlib():
        plot = lr_find_chart(result["lrs"], test.losses, test.smoothed, result["suggestion"], out / "lr_find.png")
    return {**result, "dir": str(out), "plot": str(plot) if plot else None}


def _tensorboard(out: Path, result: Dict[str, Any]) -> None:
    """``lr_find/lr``, ``lr_find/loss`` and ``lr_find/smoothed_loss`` at every step."""
    from torch.utils.tensorboard import SummaryWriter

    with writing(out / "events.out.tfevents.*"):
        writer = SummaryWriter(log_dir=str(out))
        try:
            for k, (lr, loss, smoothed) in enumerate(zip(result["lrs"], result["losses"], result["smoothed"])):
                writer.add_scalar("lr_find/lr", lr, k)
                writer.add_scalar("lr_find/loss", loss, k)
                writer.add_scalar("lr_find/smoothed_loss", smoothed, k)
            writer.flush()
        finally:
            writer.close()
