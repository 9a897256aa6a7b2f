"""Task types: what a head outputs, its loss, and how predictions are scored.

Metrics are accumulated on the device: ``init_state`` gives a fixed-size float64 vector of sums,
``update`` adds one batch to it (no host sync, so it can run every step and be all-reduced under DDP)
and ``compute`` turns the epoch's sums into plain floats.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, List, Optional, Type, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mtl.core.errors import UserError
from mtl.core.registry import Registry

TASK_TYPES = Registry("task type")
LOSSES = Registry("loss")  # name -> fn(pred, target) -> scalar loss; named by tasks.<t>.loss
METRICS = Registry("metric")  # name -> fn(pred, target) -> (sum, count) tensors; named by tasks.<t>.metrics
F64 = torch.float64
T = TypeVar("T", bound=type)


def _register(name: str) -> Callable[[T], T]:
    def deco(cls: T) -> T:
        cls.type_name = name
        return TASK_TYPES.register(name)(cls)

    return deco


def _counts(index: Tensor, size: int) -> Tensor:
    """Histogram of ``index`` over ``size`` bins; index ``size`` is an overflow bin for excluded items, dropped.

    ``index_add_`` rather than ``bincount``: bincount reads the maximum back to the host on CUDA.
    """
    index = index.reshape(-1)
    out = torch.zeros(size + 1, dtype=F64, device=index.device)
    return out.index_add_(0, index, torch.ones(index.numel(), dtype=F64, device=index.device))[:size]


def _div(a: Tensor | float, b: Tensor | float) -> Any:
    """``a / max(b, 1)``: empty sums give 0 instead of nan."""
    if isinstance(b, Tensor):
        return a / b.clamp(min=1)
    return a / max(b, 1)


@dataclass
class Task:
    """One task of a model: its loss, predictions and on-device metric sums."""

    name: str
    target: str
    out_dim: int
    weight: float = 1.0
    classes: List[str] = field(default_factory=list)

    type_name: ClassVar[str] = ""
    dense: ClassVar[bool] = False  # output is a (B, out_dim, H, W) map at input resolution
    needs_num_classes: ClassVar[bool] = False  # out_dim must come from the data or the config
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False}  # metric -> higher is better
    primary: ClassVar[str] = "loss"

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        raise NotImplementedError

    def predict(self, pred: Tensor) -> Tensor:
        raise NotImplementedError

    def state_size(self) -> int:
        raise NotImplementedError

    def init_state(self, device: torch.device | str | None = None) -> Tensor:
        """Zeroed metric sums (float64, 1-D, fixed size)."""
        return torch.zeros(self.state_size(), dtype=F64, device=device)

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        """``state`` plus this batch's sums (on the device, no host sync)."""
        raise NotImplementedError

    def compute(self, state: Tensor) -> Dict[str, float]:
        """Epoch-level metrics from the summed state (may sync)."""
        raise NotImplementedError

    def correct(self, pred: Tensor, target: Tensor) -> Tensor:
        """Number of correct predictions in the batch, as a tensor (no host sync)."""
        return (self.predict(pred) == target).sum()


def _check_smoothing(value: float) -> None:
    if not 0 <= value < 1:
        raise UserError(f"label_smoothing must be in [0, 1), got {value}")


@_register("classification")
@dataclass
class Classification(Task):
    """Softmax over ``out_dim`` logits with cross-entropy; reports ``acc`` and ``top{topk}`` (when out_dim > topk)."""

    label_smoothing: float = 0.0
    topk: int = 5

    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "acc": True}
    primary: ClassVar[str] = "acc"

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)
        if not isinstance(self.topk, int) or self.topk < 1:
            raise UserError(f"topk must be a positive integer, got {self.topk!r}")
        if self.has_topk:  # the instance reports one more metric than the class default
            self.metric_directions = {**type(self).metric_directions, f"top{self.topk}": True}

    @property
    def has_topk(self) -> bool:
        return self.out_dim > self.topk

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(pred.float(), target, label_smoothing=self.label_smoothing)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def state_size(self) -> int:
        return 3  # n, correct, top-k correct

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        n = torch.full((), target.numel(), dtype=F64, device=pred.device)
        correct = (pred.argmax(dim=1) == target).sum()
        if self.has_topk:
            top = (pred.topk(self.topk, dim=1).indices == target.unsqueeze(1)).any(dim=1).sum()
        else:
            top = correct
        return state + torch.stack([n, correct.to(F64), top.to(F64)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, correct, top = state.tolist()
        out = {"acc": _div(correct, n)}
        if self.has_topk:
            out[f"top{self.topk}"] = _div(top, n)
        return out


@_register("binary")
@dataclass
class Binary(Task):
    """Two classes from a single logit with binary cross-entropy (the cats-vs-dogs recipe)."""

    label_smoothing: float = 0.0

    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "acc": True, "f1": True}
    primary: ClassVar[str] = "acc"

    def __post_init__(self) -> None:
        _check_smoothing(self.label_smoothing)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        target = target.float()
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + 0.5 * self.label_smoothing
        return F.binary_cross_entropy_with_logits(pred.float().squeeze(1), target)

    def predict(self, pred: Tensor) -> Tensor:
        return (pred.squeeze(1) > 0).long()

    def state_size(self) -> int:
        return 5  # n, correct, tp, fp, fn

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        p, t = self.predict(pred).bool(), target.reshape(-1).bool()
        n = torch.full((), t.numel(), dtype=F64, device=pred.device)
        sums = torch.stack([(p == t).sum(), (p & t).sum(), (p & ~t).sum(), (~p & t).sum()]).to(F64)
        return state + torch.cat([n.reshape(1), sums])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, correct, tp, fp, fn = state.tolist()
        return {"acc": _div(correct, n), "f1": _div(2 * tp, 2 * tp + fp + fn)}


@_register("multilabel")
@dataclass
class Multilabel(Task):
    """``out_dim`` independent labels (float 0/1 targets), BCE with logits.

    ``map`` (mean average precision over labels with positives) comes from per-label histograms of the
    scores of positives and negatives, so it is a fixed-size sum like the rest. The ``ap_bins`` bins are
    even in asinh(logit) over logits -30..30 (a monotone map of the sigmoid score): narrow near the decision
    boundary, still resolving confident scores that saturate the sigmoid.
    ``f1_macro`` averages over labels that occur in the targets or the predictions.
    """

    pos_weight: Optional[List[float]] = None

    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "acc": True, "f1_micro": True,
                                                    "f1_macro": True, "map": True}
    primary: ClassVar[str] = "map"
    ap_bins: ClassVar[int] = 400
    ap_logit_range: ClassVar[float] = 30.0

    def __post_init__(self) -> None:
        if isinstance(self.pos_weight, (int, float)):
            self.pos_weight = [float(self.pos_weight)] * self.out_dim
        if self.pos_weight is not None:
            if len(self.pos_weight) != self.out_dim:
                raise UserError(f"pos_weight has {len(self.pos_weight)} values but the task has {self.out_dim} labels")
            self.pos_weight = [float(w) for w in self.pos_weight]
        self._pos_weight: Dict[torch.device, Tensor] = {}

    def _weights(self, device: torch.device) -> Optional[Tensor]:
        if self.pos_weight is None:
            return None
        if device not in self._pos_weight:  # one copy per device, not one per step
            self._pos_weight[device] = torch.tensor(self.pos_weight, device=device)
        return self._pos_weight[device]

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(pred.float(), target.float(), pos_weight=self._weights(pred.device))

    def predict(self, pred: Tensor) -> Tensor:
        return (pred > 0).long()

    def state_size(self) -> int:
        return 2 + 3 * self.out_dim + 2 * self.out_dim * self.ap_bins  # n, correct, tp/fp/fn[K], hist[K, 2, bins]

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        k, bins = self.out_dim, self.ap_bins
        p, t = pred > 0, target > 0.5
        n = torch.full((), t.numel(), dtype=F64, device=pred.device)
        head = torch.stack([n, (p == t).sum().to(F64)])
        confusion = torch.cat([(p & t).sum(0), (p & ~t).sum(0), (~p & t).sum(0)]).to(F64)
        half = math.asinh(self.ap_logit_range)
        score_bin = ((torch.asinh(pred.float()) + half) * (bins / (2 * half))).long().clamp(0, bins - 1)
        label = torch.arange(k, device=pred.device)
        hist = _counts((label * 2 + t.long()) * bins + score_bin, 2 * k * bins)
        return state + torch.cat([head, confusion, hist])

    def compute(self, state: Tensor) -> Dict[str, float]:
        k, bins = self.out_dim, self.ap_bins
        state = state.detach().cpu()
        n, correct = state[:2].tolist()
        tp, fp, fn = state[2:2 + 3 * k].view(3, k)
        hist = state[2 + 3 * k:].view(k, 2, bins).flip(-1)  # highest scores first
        f1 = 2 * tp / (2 * tp + fp + fn).clamp(min=1)
        occurs = (tp + fp + fn) > 0
        return {"acc": _div(correct, n),
                "f1_micro": _div(2 * tp.sum().item(), (2 * tp + fp + fn).sum().item()),
                "f1_macro": f1[occurs].mean().item() if occurs.any() else 0.0,
                "map": _mean_ap(hist[:, 1], hist[:, 0])}


def _mean_ap(pos: Tensor, neg: Tensor) -> float:
    """Mean over labels with positives of the AP from score histograms (K, bins), highest bin first.

    Within a bin, positives and negatives are taken as evenly interleaved: the j-th positive of p in a bin
    with n negatives has about j*n/(p+1) of them ahead of it. The average precision over a bin's
    positives is evaluated at a few points of j.
    """
    pos_before = pos.cumsum(-1) - pos
    neg_before = neg.cumsum(-1) - neg
    j = 1 + (pos - 1).clamp(min=0).unsqueeze(-1) * (torch.arange(8, dtype=F64) + 0.5) / 8  # (K, bins, 8)
    ahead = j * (neg / (pos + 1)).unsqueeze(-1)
    precision = (pos_before.unsqueeze(-1) + j) / (pos_before + neg_before).unsqueeze(-1).add(j + ahead)
    total = pos.sum(-1)
    ap = (pos * precision.mean(-1)).sum(-1) / total.clamp(min=1)
    has_pos = total > 0
    return ap[has_pos].mean().item() if has_pos.any() else 0.0


@_register("regression")
@dataclass
class Regression(Task):
    """``out_dim`` real outputs (float targets); ``loss`` is mse, l1 or smooth_l1; reports ``mae`` and ``rmse``."""

    loss_fn: str = "mse"

    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "mae": False, "rmse": False}
    primary: ClassVar[str] = "mae"
    losses: ClassVar[Dict[str, Callable[..., Tensor]]] = {"mse": F.mse_loss, "l1": F.l1_loss,
                                                          "smooth_l1": F.smooth_l1_loss}

    def __post_init__(self) -> None:
        if self.loss_fn not in self.losses:
            raise UserError(f"unknown regression loss {self.loss_fn!r}; use one of {', '.join(self.losses)}")

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        return self.losses[self.loss_fn](pred.float(), target.reshape(pred.shape).float())

    def predict(self, pred: Tensor) -> Tensor:
        return pred.float()

    def state_size(self) -> int:
        return 3  # n, sum |err|, sum err^2

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        err = pred.to(F64) - target.reshape(pred.shape).to(F64)
        n = torch.full((), err.numel(), dtype=F64, device=pred.device)
        return state + torch.stack([n, err.abs().sum(), err.square().sum()])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, abs_sum, sq_sum = state.tolist()
        return {"mae": _div(abs_sum, n), "rmse": math.sqrt(_div(sq_sum, n))}


@_register("segmentation")
@dataclass
class Segmentation(Task):
    """Per-pixel classes: (B, C, H, W) logits vs (B, H, W) long targets, ``ignore_index`` pixels skipped.

    Metrics from a C x C confusion matrix: ``miou`` over classes present in the targets or predictions,
    ``pixel_acc``.
    """

    ignore_index: int = -1

    dense: ClassVar[bool] = True
    needs_num_classes: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "miou": True, "pixel_acc": True}
    primary: ClassVar[str] = "miou"

    def _valid(self, target: Tensor) -> Tensor:
        return (target != self.ignore_index) & (target >= 0) & (target < self.out_dim)

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        # by hand rather than F.cross_entropy: an all-ignored batch gives 0, not nan
        valid = self._valid(target)
        logp = pred.float().log_softmax(dim=1)
        nll = -logp.gather(1, torch.where(valid, target, 0).unsqueeze(1)).squeeze(1)
        return (nll * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.argmax(dim=1)

    def state_size(self) -> int:
        return self.out_dim ** 2  # confusion[target, prediction]

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        c = self.out_dim
        index = torch.where(self._valid(target), target * c + pred.argmax(dim=1), c * c)
        return state + _counts(index, c * c)

    def compute(self, state: Tensor) -> Dict[str, float]:
        cm = state.detach().cpu().view(self.out_dim, self.out_dim)
        hits = cm.diagonal()
        union = cm.sum(0) + cm.sum(1) - hits
        present = union > 0
        return {"miou": (hits[present] / union[present]).mean().item() if present.any() else 0.0,
                "pixel_acc": _div(hits.sum().item(), cm.sum().item())}


@_register("depth")
@dataclass
class Depth(Task):
    """Per-pixel depth (B, 1, H, W); target 0 = invalid pixel. L1 loss, ``abs_err`` and ``rel_err`` on valid pixels."""

    dense: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "abs_err": False, "rel_err": False}
    primary: ClassVar[str] = "abs_err"

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        valid = target != 0
        return ((pred.float() - target.float()).abs() * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return pred.float()

    def state_size(self) -> int:
        return 3  # valid pixels, sum |err|, sum |err| / target

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        valid = target != 0
        err = (pred.float() - target.float()).abs() * valid
        rel = err / torch.where(valid, target.float().abs(), 1.0)
        return state + torch.stack([valid.sum().to(F64), err.sum(dtype=F64), rel.sum(dtype=F64)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        n, abs_sum, rel_sum = state.tolist()
        return {"abs_err": _div(abs_sum, n), "rel_err": _div(rel_sum, n)}


@_register("normals")
@dataclass
class Normals(Task):
    """Surface normals (B, 3, H, W); all-zero target = invalid pixel. Loss 1 - cosine similarity.

    Angular errors go into a histogram of 0.25 degree bins: the ``within_*`` fractions are exact and
    ``median_angle`` is within a bin; ``mean_angle`` is an exact sum.
    """

    dense: ClassVar[bool] = True
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False, "mean_angle": False, "median_angle": False,
                                                    "within_11.25": True, "within_22.5": True, "within_30": True}
    primary: ClassVar[str] = "mean_angle"
    bin_deg: ClassVar[float] = 0.25
    thresholds: ClassVar[tuple] = (11.25, 22.5, 30.0)

    @property
    def bins(self) -> int:
        return round(180 / self.bin_deg)

    def _cosine(self, pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        valid = target.abs().sum(dim=1) != 0
        cos = (self.predict(pred) * F.normalize(target.float(), dim=1)).sum(dim=1)
        return cos, valid

    def loss(self, pred: Tensor, target: Tensor) -> Tensor:
        cos, valid = self._cosine(pred, target)
        return ((1 - cos) * valid).sum() / valid.sum().clamp(min=1)

    def predict(self, pred: Tensor) -> Tensor:
        return F.normalize(pred.float(), dim=1)

    def state_size(self) -> int:
        return 2 + self.bins  # valid pixels, sum of angles, histogram

    def update(self, state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        cos, valid = self._cosine(pred, target)
        angle = torch.rad2deg(torch.acos(cos.clamp(-1, 1)))
        index = torch.where(valid, (angle / self.bin_deg).long().clamp(0, self.bins - 1), self.bins)
        head = torch.stack([valid.sum().to(F64), (angle * valid).sum(dtype=F64)])
        return state + torch.cat([head, _counts(index, self.bins)])

    def compute(self, state: Tensor) -> Dict[str, float]:
        state = state.detach().cpu()
        n, angle_sum = state[:2].tolist()
        hist = state[2:]
        cum = hist.cumsum(0)
        out = {"mean_angle": _div(angle_sum, n), "median_angle": 0.0}
        if n > 0:
            i = int(torch.searchsorted(cum, torch.tensor([n / 2], dtype=F64)).item())
            before = cum[i - 1].item() if i > 0 else 0.0
            out["median_angle"] = (i + (n / 2 - before) / max(hist[i].item(), 1)) * self.bin_deg
        for t in self.thresholds:
            out[f"within_{t:g}"] = _div(cum[round(t / self.bin_deg) - 1].item(), n)
        return out


_OUT_DIM: Dict[str, int] = {"binary": 1, "depth": 1, "normals": 3}
_RENAMED = {"regression": {"loss": "loss_fn"}}  # option -> field: a field "loss" would shadow the method
_BASE_FIELDS = {f.name for f in dataclasses.fields(Task)}


def task_options(type: str) -> List[str]:
    """The options a task type takes (besides name, target, weight, classes, num_classes)."""
    cls = TASK_TYPES.get(type)
    rename = {v: k for k, v in _RENAMED.get(type, {}).items()}
    return [rename.get(f.name, f.name) for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS]


def num_outputs_required(type: str) -> bool:
    """Whether a task of this type needs a class (output) count from the data set or the config."""
    return TASK_TYPES.get(type).needs_num_classes


def build_task(name: str, *, type: str, target: str, num_classes: Optional[int] = None, weight: float = 1.0,
               classes: Optional[List[str]] = None, **options: Any) -> Task:
    """Build a task of a registered type with the output size that type needs.

    binary: 1 output; depth: 1; normals: 3; regression: ``num_classes`` (or option ``num_outputs``, default 1);
    classification, multilabel, segmentation: ``num_classes`` (required).
    """
    cls: Type[Task] = TASK_TYPES.get(type)
    if type == "regression" and "num_outputs" in options:
        n_out = options.pop("num_outputs")
        if num_classes is not None and n_out != num_classes:
            raise UserError(f"num_outputs ({n_out}) and num_classes ({num_classes}) disagree; give one of them")
        num_classes = n_out
    known = task_options(type)
    unknown = [k for k in options if k not in known]
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise UserError(f"unknown option(s) {', '.join(unknown)} for a {type} task; {takes}")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1):
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if type in _OUT_DIM:
        out_dim = _OUT_DIM[type]
        allowed = {out_dim, 2} if type == "binary" else {out_dim}
        if num_classes is not None and num_classes not in allowed:
            raise UserError(f"a {type} task has {out_dim} output(s); num_classes={num_classes} does not fit, remove it")
    elif num_classes is None:
        if cls.needs_num_classes:
            raise UserError(f"a {type} task needs num_classes and the data set does not give it; set num_classes")
        out_dim = 1
    else:
        out_dim = num_classes
    fields = {_RENAMED.get(type, {}).get(k, k): v for k, v in options.items()}
    return cls(name=name, target=target, out_dim=out_dim, weight=weight, classes=list(classes or []), **fields)


def probabilities(task: Task, pred: Tensor) -> Tensor:
    """Class probabilities: (B, 2) for binary, per-label sigmoid for multilabel, softmax over dim 1 otherwise."""
    if isinstance(task, Binary):
        p = torch.sigmoid(pred.float().squeeze(1))
        return torch.stack([1 - p, p], dim=1)
    if isinstance(task, Multilabel):
        return torch.sigmoid(pred.float())
    if isinstance(task, (Classification, Segmentation)):
        return pred.float().softmax(dim=1)
    raise TypeError(f"a {task.type_name} task has no class probabilities")


def use_custom_loss(task: Task, name: str) -> None:
    """Train ``task`` with the registered loss ``name`` (``fn(pred, target)``) instead of its own."""
    fn = LOSSES.get(name)
    task.loss = lambda pred, target: fn(pred.float(), target)  # type: ignore[method-assign]


def add_custom_metrics(task: Task, names: List[str]) -> None:
    """Report registered metrics too: each keeps (sum, count) in the task's state and reports sum / count.

    A metric function may carry ``higher_is_better = False`` (default True).
    """
    fns = [(n, METRICS.get(n)) for n in names]
    base_size, base_update, base_compute = task.state_size(), task.update, task.compute
    task.metric_directions = {**task.metric_directions,
                              **{n: bool(getattr(fn, "higher_is_better", True)) for n, fn in fns}}

    def state_size() -> int:
        return base_size + 2 * len(fns)

    def update(state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        extra = [torch.stack([torch.as_tensor(v, dtype=F64, device=pred.device).reshape(())
                              for v in fn(pred, target)]) for _, fn in fns]
        return torch.cat([base_update(state[:base_size], pred, target), state[base_size:] + torch.cat(extra)])

    def compute(state: Tensor) -> Dict[str, float]:
        out = base_compute(state[:base_size])
        sums = state[base_size:].view(-1, 2).tolist()
        out.update({n: _div(total, count) for (n, _), (total, count) in zip(fns, sums)})
        return out

    task.state_size, task.update, task.compute = state_size, update, compute  # type: ignore[method-assign]
