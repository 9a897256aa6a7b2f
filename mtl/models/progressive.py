"""Progressive neural networks (Rusu et al. 2016, arXiv 1606.04671) for CNN encoders.

One column (a whole encoder plus a pooled head) per task. Column k also reads the stage maps of the frozen
columns 0..k-1 through lateral adapters (the paper's eq. 2, convolutional form), so what earlier tasks learnt is
reused without being changed: earlier columns get no gradient, are not handed to the optimizer and keep their
BatchNorm statistics.

Layout of column k (k >= 1), for stages 0..n-1 of the split encoder::

    h_0 = stage_0(x)
    h_i = stage_i(h_{i-1}) + LateralAdapter_i(h_{i-1} of columns 0..k-1)      (i >= 1)
    logits = head(mean(h_{n-1})) + LinearLateral(mean(h_{n-1}) of columns 0..k-1)

The maps h_i (lateral included) are what later columns read.
"""

from __future__ import annotations

import re
from itertools import chain
from numbers import Real
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from einops import reduce
from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.core.runtime import evaluating
from mtl.models.freezing import freeze_norm_stats
from mtl.models.heads import POOLED, head_input

_RESNETS = r"resnet\d+|resnext.*|wide_resnet.*"
SUPPORTED = "small_cnn, resnet*, resnext*, wide_resnet*"


# ---------------------------------------------------------------------------------------------------- stages
def split_stages(encoder: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The encoder as consecutive stage modules: applied in order to an image they give the stage maps named in
    ``encoder.feature_info``. The stages reuse the encoder's own (possibly pretrained) submodules.

    small_cnn: its ``stage1..stageN``. Torchvision resnet-family encoders: ``layer1`` (conv1, bn1, relu, maxpool,
    layer1), ``layer2``, ``layer3``, ``layer4``; the traced encoder's ``layerN`` are containers without a forward,
    so each stage is the matching piece of the encoder's fx graph (calling the same module objects).
    """
    name = getattr(encoder, "name", None)
    if name == "small_cnn":
        return [(info["name"], encoder.get_submodule(info["name"])) for info in encoder.feature_info]
    if isinstance(name, str) and re.fullmatch(_RESNETS, name):
        names = [info["name"] for info in encoder.feature_info]
        if names != ["layer1", "layer2", "layer3", "layer4"]:
            raise UserError(f"encoder {name!r}: expected stages layer1..layer4, found {', '.join(names)}")
        if isinstance(encoder, torch.fx.GraphModule):
            return _split_graph(encoder, names)
        stem = nn.Sequential(encoder.conv1, encoder.bn1, encoder.relu, encoder.maxpool, encoder.layer1)
        return [("layer1", stem)] + [(n, encoder.get_submodule(n)) for n in names[1:]]
    raise UserError(f"progressive networks support the encoders {SUPPORTED}; got {name or type(encoder).__name__!r}")


def _split_graph(encoder: torch.fx.GraphModule, names: Sequence[str]) -> List[Tuple[str, nn.Module]]:
    """Cut a traced encoder's graph at the stage outputs ``names``: one GraphModule per stage, input = the
    previous stage's map (the image for the first), sharing the encoder's submodules."""
    graph = getattr(encoder, "train_graph", encoder.graph)
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    returned = next(n for n in nodes if n.op == "output").args[0]
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1 or not isinstance(returned, dict):
        raise UserError(f"encoder {encoder.name!r}: its traced graph cannot be split into stages")
    boundary, done = placeholders[0], {placeholders[0]}
    stages = []
    for name in names:
        end = returned[name]
        needed, todo = set(), [end]
        while todo:  # everything the stage output depends on that earlier stages did not compute
            n = todo.pop()
            if n in needed or (n in done and n.op != "get_attr"):
                continue
            needed.add(n)
            todo.extend(n.all_input_nodes)
        g = torch.fx.Graph()
        env = {boundary: g.placeholder("x")}
        for n in sorted(needed, key=order.__getitem__):
            outside = [a.name for a in n.all_input_nodes if a not in needed and a is not boundary]
            if outside:
                raise UserError(
                    f"encoder {encoder.name!r}: stage {name} reads {', '.join(outside)} from before "
                    "the previous stage's output; it cannot be split into stages"
                )
            env[n] = g.node_copy(n, env.__getitem__)
        g.output(env[end])
        stages.append((name, torch.fx.GraphModule(encoder, g, class_name=f"{encoder.name}_{name}")))
        done |= {n for n in needed if n.op != "get_attr"}
        boundary = end
    return stages


# ---------------------------------------------------------------------------------------------------- laterals
class LateralAdapter(nn.Module):
    """Conv lateral into stage i of a new column (eq. 2 for conv layers): ``alpha * cat(h_{i-1} of earlier
    columns)`` -> 1x1 conv to ``reduced`` channels -> ReLU -> 3x3 conv with ``stride`` to ``out_channels``;
    resized (nearest) to the target map when odd sizes make it differ. Its output is added to the stage's output."""

    def __init__(self, in_channels: int, out_channels: int, reduced: int, stride: int, alpha: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.reduce = nn.Conv2d(in_channels, reduced, 1)
        self.project = nn.Conv2d(reduced, out_channels, 3, stride=stride, padding=1)

    def forward(self, maps: Sequence[Tensor], size: Tuple[int, int]) -> Tensor:
        """``maps``: h_{i-1} of columns 0..k-1; ``size``: the (h, w) of the new column's stage-i map."""
        a = self.alpha * torch.cat(list(maps), dim=1)
        out = self.project(F.relu(self.reduce(a)))
        if tuple(out.shape[-2:]) != tuple(size):
            out = F.interpolate(out, size=tuple(size), mode="nearest")
        return out


class LinearLateral(nn.Module):
    """MLP lateral into the head: ``alpha * cat(pooled last-stage features of earlier columns)`` -> Linear(hidden)
    -> ReLU -> Linear(out_dim); added to the new column's head output."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int, alpha: float) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, vectors: Sequence[Tensor]) -> Tensor:
        return self.mlp(self.alpha * torch.cat(list(vectors), dim=1))


# ---------------------------------------------------------------------------------------------------- column
class Column(nn.Module):
    """One task's column: ``stages`` (the split encoder), ``laterals`` (one LateralAdapter per stage i >= 1; empty
    for column 0 or without laterals), ``head`` (pooled head on the averaged last stage) and ``head_lateral``
    (LinearLateral, or None). ``forward(x, previous)`` gives ``{stage name: map, "out": pooled}``."""

    def __init__(
        self,
        task: str,
        stages: Sequence[Tuple[str, nn.Module]],
        feature_info: Sequence[Dict[str, Any]],
        head: nn.Module,
        head_out_dim: int,
        previous: int = 0,
        alpha: float = 0.1,
        adapter_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.stage_names = [name for name, _ in stages]
        self.feature_info = [dict(info) for info in feature_info]
        self.stages = nn.ModuleList(module for _, module in stages)
        self.head = head
        self.laterals = nn.ModuleList()
        self.head_lateral: Optional[LinearLateral] = None
        if previous > 0:
            info = self.feature_info
            for i in range(1, len(info)):
                stride = max(1, info[i]["reduction"] // info[i - 1]["reduction"])
                self.laterals.append(
                    LateralAdapter(
                        previous * info[i - 1]["channels"],
                        info[i]["channels"],
                        adapter_channels or info[i - 1]["channels"],
                        stride,
                        alpha,
                    )
                )
            last = info[-1]["channels"]
            self.head_lateral = LinearLateral(previous * last, head_out_dim, adapter_channels or last, alpha)

    def forward(self, x: Tensor, previous: Sequence[Dict[str, Tensor]] = ()) -> Dict[str, Tensor]:
        """Stage maps (laterals from ``previous`` columns' features added when this column has them) and "out"."""
        features: Dict[str, Tensor] = {}
        h = x
        for i, (name, stage) in enumerate(zip(self.stage_names, self.stages)):
            out = stage(h)
            if i >= 1 and len(self.laterals):
                below = [list(p.values())[i - 1] for p in previous]  # by position: names may differ by column
                out = out + self.laterals[i - 1](below, tuple(out.shape[-2:]))
            features[name] = h = out
        features["out"] = reduce(h, "b c h w -> b c", "mean")
        return features

    def predict(self, features: Dict[str, Tensor], previous: Sequence[Dict[str, Tensor]] = ()) -> Tensor:
        """The head on this column's pooled features, plus the head lateral from earlier columns."""
        out = self.head(features["out"])
        if self.head_lateral is not None:
            out = out + self.head_lateral([p["out"] for p in previous])
        return out

    @property
    def frozen(self) -> bool:
        """True when no parameter of the column trains."""
        return not any(p.requires_grad for p in self.parameters())


# ---------------------------------------------------------------------------------------------------- network
class ProgressiveNet(nn.Module):
    """A growing list of columns, one per task, in the order the tasks were added.

    ``encoder_fn`` builds a fresh encoder for a column when ``add_column`` gets none; ``alpha`` is the initial
    value of every lateral's learned scale; ``lateral=False`` gives independent columns (the baseline);
    ``adapter_channels`` is the width of every lateral's reduction (default: the channels of the stage it reads,
    and the last stage's channels for the head lateral).
    """

    def __init__(
        self,
        encoder_fn: Optional[Callable[[], nn.Module]] = None,
        alpha: float = 0.1,
        lateral: bool = True,
        adapter_channels: Optional[int] = None,
    ) -> None:
        super().__init__()
        if encoder_fn is not None and not callable(encoder_fn):
            raise UserError(f"progressive: encoder_fn must be callable or None, got {encoder_fn!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, Real):
            raise UserError(f"progressive: alpha must be a number, got {alpha!r}")
        if not isinstance(lateral, bool):
            raise UserError(f"progressive: lateral must be true or false, got {lateral!r}")
        if adapter_channels is not None and (
            isinstance(adapter_channels, bool) or not isinstance(adapter_channels, int) or adapter_channels < 1
        ):
            raise UserError(
                f"progressive: adapter_channels must be a positive integer or null, got {adapter_channels!r}"
            )
        self.encoder_fn = encoder_fn
        self.alpha = float(alpha)
        self.lateral = lateral
        self.adapter_channels = adapter_channels
        self.columns = nn.ModuleList()

    @property
    def tasks(self) -> List[str]:
        """Task names, in column order."""
        return [c.task for c in self.columns]

    def add_column(self, task: str, head: nn.Module, encoder: Optional[nn.Module] = None) -> Column:
        """Freeze every existing column (all parameters, adapters and heads included) and append a new trainable
        column for ``task``: stages from ``encoder`` (else ``encoder_fn()``), ``head`` a pooled head taking the
        last stage's channels. The column goes to the device of the existing columns."""
        if not isinstance(task, str) or not task:
            raise UserError(f"progressive: a task name must be a non-empty string, got {task!r}")
        if task in self.tasks:
            raise UserError(f"progressive: task {task!r} already has a column; tasks: {', '.join(self.tasks)}")
        if not isinstance(head, nn.Module):
            raise UserError(f"progressive: the head of task {task!r} must be an nn.Module, got {type(head).__name__}")
        if head_input(head) != POOLED:
            raise UserError(
                f"progressive: task {task!r} needs a pooled head (e.g. linear or mlp), not {type(head).__name__}"
            )
        if encoder is None:
            if self.encoder_fn is None:
                raise UserError(
                    f"progressive: add_column({task!r}) needs an encoder; pass encoder= or give "
                    "ProgressiveNet an encoder_fn"
                )
            encoder = self.encoder_fn()
        stages = split_stages(encoder)
        info = [dict(i) for i in encoder.feature_info]
        if self.columns:
            self._check_like_first(task, info)
        in_dim = info[-1]["channels"]
        column = Column(
            task,
            stages,
            info,
            head,
            _head_out_dim(task, head, in_dim),
            previous=len(self.columns) if self.lateral else 0,
            alpha=self.alpha,
            adapter_channels=self.adapter_channels,
        )
        if self.columns:
            old = {id(p) for p in self.parameters()}
            if any(id(p) in old for p in column.parameters()):
                raise UserError(
                    f"progressive: the encoder or head of task {task!r} is already used by another column; "
                    "give each column its own"
                )
            for c in self.columns:
                c.requires_grad_(False)
            column.to(next(chain(self.columns[0].parameters(), self.columns[0].buffers())).device)
        self.columns.append(column)
        self.train(self.training)  # frozen columns to eval, the new one to the net's mode
        return column

    def _check_like_first(self, task: str, info: List[Dict[str, Any]]) -> None:
        first = self.columns[0]

        def shape(i: List[Dict[str, Any]]) -> List[Tuple[int, int]]:
            return [(s["channels"], s["reduction"]) for s in i]

        if shape(info) != shape(first.feature_info):
            raise UserError(
                f"progressive: the encoder of task {task!r} has stages (channels, reduction) "
                f"{shape(info)} but column {first.task!r} has {shape(first.feature_info)}; "
                "every column needs the same architecture"
            )

    def index(self, task: Optional[str]) -> int:
        """The column index of ``task``; UserError for a missing or unknown task."""
        if task not in self.tasks:
            known = ", ".join(self.tasks) or "none yet"
            raise UserError(f"progressive: unknown task {task!r}; known tasks: {known}")
        return self.tasks.index(task)

    def features(self, x: Tensor, task: Optional[str]) -> List[Dict[str, Tensor]]:
        """Features of columns 0..k (k = the column of ``task``): ``{stage name: map, "out": pooled}`` each.
        Later columns do not run."""
        k = self.index(task)
        out: List[Dict[str, Tensor]] = []
        for column in self.columns[: k + 1]:
            out.append(column(x, out))
        return out

    def forward(self, x: Tensor, task: Optional[str] = None) -> Tensor:
        """Column k's head output for ``task`` (columns 0..k run, later ones never)."""
        feats = self.features(x, task)
        return self.columns[len(feats) - 1].predict(feats[-1], feats[:-1])

    def view(self, task: str) -> "ColumnView":
        """The single-task model the Trainer trains and evaluates for ``task``."""
        return ColumnView(self, task)

    def column_parameters(self, task: str) -> Dict[str, int]:
        """Parameter counts of ``task``'s column: stages, laterals (conv and head laterals with their alphas),
        head and total."""
        column = self.columns[self.index(task)]
        laterals = chain(
            column.laterals.parameters(), column.head_lateral.parameters() if column.head_lateral is not None else ()
        )
        counts = {
            "stages": _count(column.stages.parameters()),
            "laterals": _count(laterals),
            "head": _count(column.head.parameters()),
        }
        counts["total"] = _count(column.parameters())
        return counts

    def train(self, mode: bool = True) -> "ProgressiveNet":
        """Train mode for what trains; frozen columns (and any norm layer with all parameters frozen) stay in eval,
        so their BatchNorm statistics never change."""
        super().train(mode)
        if mode:
            for column in self.columns:
                if column.frozen:
                    column.eval()
            freeze_norm_stats(self)
        return self


class ColumnView(nn.Module):
    """What the Trainer trains for one task: ``forward(x) -> {task: net(x, task)}``.

    Holds the whole net (``self.net``), so ``state_dict``/``load_state_dict`` cover every column; the optimizer
    built from it (``mtl.optim.build_optimizer``) gets only the trainable parameters, i.e. the newest column's.
    """

    def __init__(self, net: ProgressiveNet, task: str) -> None:
        super().__init__()
        net.index(task)
        self.net = net
        self.task = task

    @property
    def column(self) -> Column:
        return self.net.columns[self.net.index(self.task)]

    @property
    def heads(self) -> nn.ModuleDict:
        """``{task: head}`` (not registered: the head's parameters stay under ``net``)."""
        return nn.ModuleDict({self.task: self.column.head})

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return {self.task: self.net(x, self.task)}

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        """The column's trainable stage (encoder) parameters."""
        return (p for p in self.column.stages.parameters() if p.requires_grad)

    def task_parameters(self) -> Iterator[nn.Parameter]:
        """Every other trainable parameter: the column's laterals and head."""
        shared = {id(p) for p in self.shared_parameters()}
        return (p for p in self.net.parameters() if p.requires_grad and id(p) not in shared)

    def train(self, mode: bool = True) -> "ColumnView":
        super().train(mode)  # reaches ProgressiveNet.train, which keeps frozen columns in eval
        return self


# ---------------------------------------------------------------------------------------------------- helpers
def _count(params: Iterator[nn.Parameter]) -> int:
    return sum(p.numel() for p in params)


def _head_out_dim(task: str, head: nn.Module, in_dim: int) -> int:
    """The head's output width, by a dry run on a (2, in_dim) input."""
    p = next(chain(head.parameters(), head.buffers()), None)
    x = torch.zeros(
        2,
        in_dim,
        device=p.device if p is not None else None,
        dtype=p.dtype if p is not None and p.is_floating_point() else None,
    )
    try:
        with evaluating(head):
            y = head(x)
    except Exception as e:  # noqa: BLE001 - any failure means the head does not fit the column
        raise UserError(
            f"progressive: the head of task {task!r} does not take (B, {in_dim}) pooled features: {e}"
        ) from None
    if not isinstance(y, Tensor) or y.dim() != 2:
        raise UserError(
            f"progressive: the head of task {task!r} must map (B, {in_dim}) to (B, out_dim), "
            f"got {getattr(y, 'shape', type(y).__name__)}"
        )
    return int(y.shape[1])
