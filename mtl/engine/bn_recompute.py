"""``train.bn_recompute``: after training, the BatchNorm statistics of the delivered weights recomputed over the
training split, validated, and delivered when they validate better."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from mtl.core import distributed as dist
from mtl.core.checkpoint import load_checkpoint, save_checkpoint
from mtl.core.rundir import resume_hint
from mtl.core.waiting import ANNOUNCE_AFTER_S, announced
from mtl.engine.averaging import recompute_bn_on_train
from mtl.engine.trainer import Hook, Trainer


class BatchNormRecomputeHook(Hook):
    """Running statistics lag the weights they normalise: each training step moves them by ``momentum`` towards that
    batch's statistics, while the weights keep changing, so after few steps, or with a small momentum (0.01 in models
    ported from TensorFlow), they describe older weights. As SWA's ``bn_update`` (Izmailov et al. 2018;
    ``torch.optim.swa_utils.update_bn``), at the end of training the BatchNorm layers that train get statistics of
    the weights: their cumulative average over one pass of the training split (``momentum=None``: the mean over
    batches of each batch's mean and unbiased variance), fed as ``update_bn`` is fed the training loader: training
    transforms, shuffled, the order and draws seeded by ``train.seed`` (``averaging.recompute_bn_on_train``).
    Training transforms: the inputs whose statistics the BatchNorm weights were learnt with, and one path for every
    pipeline (per item, batched, multi-input). Frozen layers (in eval mode while training) keep their statistics.

    The candidates are best.pt's weights and, when training ended on another epoch, the final ones (with
    ``train.ema`` the EMA weights): lagging statistics also mislead the choice of the best epoch, e.g. every epoch at
    chance selects the first. Each is recomputed and validated; the better one (by ``train.monitor``; a tie keeps
    best.pt's) is saved as ``checkpoints/best_bn.pt`` and becomes best.pt (what eval, predict, ``run:`` weights and the
    test split's ``best`` use) when its score is higher than the best epoch's. Without a validation split, best.pt's
    weights are recomputed and delivered. ``result``: the metrics before and after, for summary.json.

    Runs on every process, before ``TensorBoardHook`` and ``CheckpointHook`` (best.pt and last.pt of the last epoch are
    written by then; process 0 writes); when the recomputed weights are delivered, their validation pass's confusion
    matrices replace ``trainer.best_confusion``. The pass depends on the weights, the data and
    the seed only (never on the statistics it replaces), so a run interrupted here and resumed computes the same
    statistics again, also from a best.pt already replaced.
    """

    def __init__(self, run_dir: Path, meta: Mapping[str, Any]) -> None:
        self.dir = Path(run_dir) / "checkpoints"
        self.meta = dict(meta)
        self.then = functools.partial(resume_hint, Path(run_dir))
        self.result: Optional[Dict[str, Any]] = None

    def after_train(self, trainer: Trainer) -> None:
        dist.barrier()  # process 0 has written best.pt and last.pt
        best = self.dir / "best.pt"
        if trainer.best["epoch"] is None or not best.is_file():
            return
        state = load_checkpoint(best)
        # a best.pt that an interrupted run had already replaced says which epoch's weights it holds
        candidates = [(state.get("bn_recompute", {}).get("epoch", trainer.best["epoch"]), state["model"])]
        if "val" in trainer.loaders and trainer.epoch != candidates[0][0]:
            last = load_checkpoint(self.dir / "last.pt")
            candidates.append((trainer.epoch, last["ema"]["model"] if "ema" in last else last["model"]))
        waiting = announced(
            f"recomputing the BatchNorm statistics of epoch {' and '.join(str(e) for e, _ in candidates)} over "
            f"the training split (train.bn_recompute)",
            lambda seconds: f"recomputed the BatchNorm statistics in {seconds:.1f} s",
            ANNOUNCE_AFTER_S,
            enabled=dist.is_main(),
        )
        with waiting:
            tried = [_recomputed(trainer, epoch, weights) for epoch, weights in candidates]
        confusions = [entry.pop("confusion") for entry, _ in tried]
        chosen, recomputed = tried[0]
        for entry, statistics in tried[1:]:
            if entry["score"] > chosen["score"]:  # a tie keeps best.pt's
                chosen, recomputed = entry, statistics
        before = trainer.history[trainer.best["epoch"] - 1]
        result: Dict[str, Any] = {
            **chosen,
            "val_before": before.get("val_ema", before.get("val")),
            "score_before": trainer.best["score"],
            "candidates": [entry for entry, _ in tried],
        }
        result["delivered"] = chosen["score"] is None or chosen["score"] > result["score_before"]
        if result["delivered"] and "val" in trainer.loaders:
            trainer.best_confusion = confusions[next(i for i, (entry, _) in enumerate(tried) if entry is chosen)]
        trainer.bn_recompute_result = result
        trainer.model.load_state_dict(recomputed if result["delivered"] else state["model"])
        if dist.is_main():
            metrics = {"epoch": chosen["epoch"], "val": chosen["val"], "score": chosen["score"], "bn_recompute": True}
            saved = {**state, "model": recomputed, "epoch": chosen["epoch"], "metrics": metrics, **self.meta}
            if "model_raw" in state and chosen["epoch"] != candidates[0][0]:  # train.ema: the final trained weights
                saved["model_raw"] = last["model"]
            saved["bn_recompute"] = {k: result[k] for k in ("epoch", "batches", "delivered")}
            save_checkpoint(saved, self.dir / "best_bn.pt", self.then)
            if result["delivered"]:
                save_checkpoint(saved, best, self.then)
        self.result = result


def _recomputed(trainer: Trainer, epoch: int, weights: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``weights`` (of ``epoch``) with recomputed BatchNorm statistics, validated: ``{epoch, batches, val, score}``
    (no validation split: ``val`` and ``score`` None) and the state dict."""
    trainer.model.load_state_dict(weights)
    batches = recompute_bn_on_train(trainer.model, trainer)
    val = trainer.run_phase("val") if "val" in trainer.loaders else None
    entry = {"epoch": epoch, "batches": batches, "val": val, "score": None if val is None else trainer.monitor(val)}
    entry["confusion"] = trainer._val_confusion()
    return entry, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def bn_recompute_result(hooks: Sequence[Hook]) -> Optional[Dict[str, Any]]:
    """The ``result`` of the run's ``BatchNormRecomputeHook`` (None without one, or without a best epoch)."""
    return next((h.result for h in hooks if isinstance(h, BatchNormRecomputeHook)), None)
