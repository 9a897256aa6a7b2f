"""The task-type contract (``Task``), the registries of task types, losses and metrics, and ``build_task``.

A task type is one class (``mtl/tasks/<type>.py``) that answers every question mtl asks about its kind of task:
its output size, loss and metrics, class probabilities, whether it gets a confusion matrix, how a prediction is
drawn, and how its targets change when an image is flipped, resized, cropped or zoomed. Nothing else in mtl names a
task type.

Metrics are accumulated on the device: ``init_state`` gives a fixed-size float64 vector of sums,
``update`` adds one batch to it (no host sync, so it can run every step and be all-reduced under DDP)
and ``compute`` turns the epoch's sums into plain floats.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import (
    Any,
    Callable,
    ClassVar,
    Dict,
    List,
    Mapping,
    Optional,
    Tuple,
    Type,
    TypeVar,
)

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from mtl.core.errors import UserError
from mtl.core.registry import Registry
from mtl.tasks.drawing import card, colormap

T = TypeVar("T", bound=type)


class TaskTypes(Registry):
    """Task types by name; registering a class also sets its ``type_name``."""

    def register(self, name: str | None = None) -> Callable[[T], T]:
        outer = super().register(name)

        def deco(cls: T) -> T:
            cls.type_name = name or cls.__name__
            return outer(cls)

        return deco


TASK_TYPES = TaskTypes("task type")
LOSSES = Registry("loss")  # name -> fn(pred, target) -> scalar loss; named by tasks.<t>.loss
METRICS = Registry("metric")  # name -> fn(pred, target) -> (sum, count) tensors; named by tasks.<t>.metrics
F64 = torch.float64


def register(name: str) -> Callable[[T], T]:
    """``@register("classification")``: ``TASK_TYPES.register`` (sets the class's ``type_name``)."""
    return TASK_TYPES.register(name)


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
    """One task of a model: its loss, predictions and on-device metric sums, and the facts of its type."""

    name: str
    target: str
    out_dim: int
    weight: float = 1.0
    classes: List[str] = field(default_factory=list)

    type_name: ClassVar[str] = ""
    dense: ClassVar[bool] = False  # output is a (B, out_dim, H, W) map at input resolution
    needs_num_classes: ClassVar[bool] = False  # out_dim must come from the data or the config
    fixed_outputs: ClassVar[Optional[int]] = None  # the head's output size when the type fixes it (binary: 1)
    outputs_key: ClassVar[str] = "num_classes"  # the key of a target spec (and task option) giving the output size
    option_fields: ClassVar[Dict[str, str]] = {}  # task option -> dataclass field, where the names differ
    confusion: ClassVar[bool] = False  # image-level class predictions: a confusion matrix, labelled image grids
    has_probabilities: ClassVar[bool] = False  # ``probabilities`` gives class probabilities
    metric_directions: ClassVar[Dict[str, bool]] = {"loss": False}  # metric -> higher is better
    primary: ClassVar[str] = "loss"
    # data.mix can train it: ``soft_target`` gives targets that mix linearly and that ``loss`` takes
    mixable: ClassVar[bool] = False

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

    def soft_target(self, target: Tensor) -> Tensor:
        """A batch of targets as floats that Mixup/CutMix blend linearly (``data.mix``) and that ``loss`` takes, with
        ``loss`` linear in them, so that the loss of blended targets is the blend of the losses (types with
        ``mixable``)."""
        raise TypeError(f"a {self.type_name} task's targets cannot be mixed")

    def correct(self, pred: Tensor, target: Tensor) -> Tensor:
        """Number of correct predictions in the batch, as a tensor (no host sync)."""
        return (self.predict(pred) == target).sum()

    # ------------------------------------------------------------------ output size
    @classmethod
    def accepts_num_classes(cls, n: int) -> bool:
        """Whether ``num_classes: n`` fits a type with ``fixed_outputs``."""
        return n == cls.fixed_outputs

    @classmethod
    def check_data_classes(cls, task: str, n: Optional[int]) -> None:
        """Refuse a data set whose target has ``n`` classes that this type cannot learn (binary: n != 2)."""

    # ------------------------------------------------------------------ reading predictions
    def probabilities(self, pred: Tensor) -> Tensor:
        """Class probabilities of the head's output ``pred`` (types with ``has_probabilities``)."""
        raise TypeError(f"a {self.type_name} task has no class probabilities")

    def confusion_classes(self) -> int:
        """The size of this task's confusion matrix (types with ``confusion``)."""
        return self.out_dim

    def draw(self, output: Tensor, image: Tensor) -> Tensor:
        """One dense prediction as a (3, H, W) picture in [0, 1]: ``output`` is the head's raw (C, H, W) output for
        one image, ``image`` the un-normalised input (3, H, W) in [0, 1]. Default: the colormap of the (first
        channel of the) prediction."""
        predicted = self.predict(output.detach().float().cpu()[None])[0]
        return colormap(predicted[0] if predicted.ndim == 3 else predicted)

    def draw_target(self, target: Tensor, image: Tensor) -> Tensor:
        """One image's ground truth drawn as ``draw`` draws a prediction, (3, H, W) in [0, 1]. Default: the colormap
        of the (first channel of the) target."""
        t = target.detach().float().cpu()
        return colormap(t[0] if t.ndim == 3 else t)

    def draw_key(self, outputs: Tensor, targets: Tensor) -> Optional[Image.Image]:
        """What the colours of ``draw`` and ``draw_target`` mean for these outputs and targets (a class legend, a
        colour bar), or None. Default: None."""
        return None

    def overlay(self, outputs: Tensor, targets: Tensor, images: Tensor) -> Tensor:
        """The picture of a dense task on a few validation images (TensorBoard's ``val/overlay_<task>``): one row
        per image with the input, its ground truth (``draw_target``) and the prediction (``draw``), each enlarged to
        a readable size, and ``draw_key`` to the right. ``outputs`` (N, C, H, W) are the head's raw outputs,
        ``targets`` the N targets, ``images`` (N, 3, H, W) in [0, 1]. Returns uint8 (3, H', W')."""
        outputs, targets = outputs.detach().float().cpu(), self.targets_like(targets, outputs)
        rows = [
            [images[i], self.draw_target(targets[i], images[i]), self.draw(outputs[i], images[i])]
            for i in range(len(outputs))
        ]
        return card(rows, key=self.draw_key(outputs, targets))

    @classmethod
    def targets_like(cls, targets: Tensor, outputs: Tensor) -> Tensor:
        """A batch of dense targets on the CPU at the outputs' height and width (``resize_target``)."""
        targets = targets.detach().cpu()
        size = tuple(outputs.shape[-2:])
        if tuple(targets.shape[-2:]) == size:
            return targets
        return torch.stack([cls.resize_target(t, size) for t in targets])

    # ------------------------------------------------------------------ target geometry (dense targets)
    # A target of one item is (C, H, W) or, for per-pixel labels, (H, W); batches add a leading B. Image-level
    # targets do not move with the image: the defaults return them unchanged unless the type is dense.
    @classmethod
    def flip_target(cls, target: Tensor) -> Tensor:
        """The target of the left-right mirrored image."""
        return target.flip(-1) if cls.dense else target

    @classmethod
    def resize_target(cls, target: Tensor, size: Tuple[int, int]) -> Tensor:
        """The target of the image resized to ``size`` (h, w): nearest, so no labels or depths are blended."""
        if not cls.dense or tuple(target.shape[-2:]) == tuple(size):
            return target
        return nearest(target, size)

    @classmethod
    def crop_target(cls, target: Tensor, top: int, left: int, height: int, width: int) -> Tensor:
        """The target of the image's window at (top, left) of size (height, width)."""
        return target[..., top : top + height, left : left + width] if cls.dense else target

    @classmethod
    def zoom_target(cls, target: Tensor, scale: float, spec: Mapping[str, Any]) -> Tensor:
        """The target's values when the camera comes ``scale`` times closer (geometry is ``resize_target``'s);
        ``spec`` is the data set's declaration of the target. Default: unchanged."""
        return target


_BASE_FIELDS = {f.name for f in dataclasses.fields(Task)}


def check_smoothing(value: float) -> None:
    if not 0 <= value < 1:
        raise UserError(f"label_smoothing must be in [0, 1), got {value}")


def nearest(target: Tensor, size: Tuple[int, int]) -> Tensor:
    """A (C, H, W) or (H, W) target resized to ``size`` by nearest-exact sampling, in its own dtype."""
    x = target[None].float() if target.dim() == 3 else target[None, None].float()
    out = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="nearest-exact")
    return (out[0] if target.dim() == 3 else out[0, 0]).to(target.dtype)


def task_options(type: str) -> List[str]:
    """The options a task type takes (besides name, target, weight, classes, num_classes)."""
    cls = TASK_TYPES.get(type)
    rename = {v: k for k, v in cls.option_fields.items()}
    return [rename.get(f.name, f.name) for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS]


def num_outputs_required(type: str) -> bool:
    """Whether a task of this type needs a class (output) count from the data set or the config."""
    return TASK_TYPES.get(type).needs_num_classes


def build_task(
    name: str,
    *,
    type: str,
    target: str,
    num_classes: Optional[int] = None,
    weight: float = 1.0,
    classes: Optional[List[str]] = None,
    **options: Any,
) -> Task:
    """Build a task of a registered type with the output size that type needs: ``fixed_outputs`` when the type
    fixes it (binary 1, depth 1, normals 3), else ``num_classes`` (or the type's ``outputs_key`` option, e.g. a
    regression's ``num_outputs``; default 1 unless ``needs_num_classes``)."""
    cls: Type[Task] = TASK_TYPES.get(type)
    if cls.outputs_key != "num_classes" and cls.outputs_key in options:
        n_out = options.pop(cls.outputs_key)
        if num_classes is not None and n_out != num_classes:
            raise UserError(f"{cls.outputs_key} ({n_out}) and num_classes ({num_classes}) disagree; give one of them")
        num_classes = n_out
    known = task_options(type)
    unknown = [k for k in options if k not in known]
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes none"
        raise UserError(f"unknown option(s) {', '.join(unknown)} for a {type} task; {takes}")
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise UserError(f"num_classes must be a positive integer, got {num_classes!r}")
    if cls.fixed_outputs is not None:
        out_dim = cls.fixed_outputs
        if num_classes is not None and not cls.accepts_num_classes(num_classes):
            raise UserError(f"a {type} task has {out_dim} output(s); num_classes={num_classes} does not fit, remove it")
    elif num_classes is None:
        if cls.needs_num_classes:
            raise UserError(f"a {type} task needs num_classes and the data set does not give it; set num_classes")
        out_dim = 1
    else:
        out_dim = num_classes
    fields = {cls.option_fields.get(k, k): v for k, v in options.items()}
    return cls(name=name, target=target, out_dim=out_dim, weight=weight, classes=list(classes or []), **fields)


def probabilities(task: Task, pred: Tensor) -> Tensor:
    """``task.probabilities(pred)`` (kept for code written before task types owned it)."""
    return task.probabilities(pred)


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
    task.metric_directions = {
        **task.metric_directions,
        **{n: bool(getattr(fn, "higher_is_better", True)) for n, fn in fns},
    }

    def state_size() -> int:
        return base_size + 2 * len(fns)

    def update(state: Tensor, pred: Tensor, target: Tensor) -> Tensor:
        extra = [
            torch.stack([torch.as_tensor(v, dtype=F64, device=pred.device).reshape(()) for v in fn(pred, target)])
            for _, fn in fns
        ]
        return torch.cat([base_update(state[:base_size], pred, target), state[base_size:] + torch.cat(extra)])

    def compute(state: Tensor) -> Dict[str, float]:
        out = base_compute(state[:base_size])
        sums = state[base_size:].view(-1, 2).tolist()
        out.update({n: _div(total, count) for (n, _), (total, count) in zip(fns, sums)})
        return out

    task.state_size, task.update, task.compute = state_size, update, compute  # type: ignore[method-assign]
