"""Encoders: backbones that map images to per-stage feature maps plus a pooled vector ("out").

Every encoder's ``forward(x)`` returns ``{stage name: (B, C, h, w) map, ..., "out": (B, out_dim)}`` and carries
``name``, ``out_dim``, ``min_input_size`` and ``feature_info`` (one ``{"name", "channels", "reduction"}`` per stage);
optionally ``fixed_input_size`` ((H, W): the only size it takes) and ``notes`` (how it differs from the model it
comes from). ``check_input_size`` is the one rule for which image sizes an encoder takes.

Torchvision classifiers are turned into encoders with torch.fx (``create_feature_extractor``): the classifier's last
layer becomes ``nn.Identity`` and its output is returned as "out", so parameter and buffer names stay exactly
torchvision's.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
import re
from typing import Any, Sequence

import torch
import torchvision
from einops import rearrange, reduce
from torch import Tensor, nn
from torchvision.models import MaxVit, VisionTransformer
from torchvision.models.feature_extraction import (
    DualGraphModule,
    create_feature_extractor,
)

from mtl.core.errors import UserError
from mtl.core.registry import Registry
from mtl.core.runtime import evaluating
from mtl.models.timm_encoders import timm_encoder
from mtl.models.weights import TIMM_PREFIX, load_weights

ENCODERS = Registry("encoder")

# Stage nodes of the torchvision families we know: the last trunk block at each reduction 4, 8, 16, 32
# (squeezenet stops at 16; vit has its patch embedding and its encoder output, both at 16).
# Other torchvision classifiers get theirs found by shape (see _find_stages).
_STAGE_NODES: list[tuple[str, tuple[str, ...]]] = [
    (r"resnet\d+|resnext.*|wide_resnet.*", ("layer1", "layer2", "layer3", "layer4")),
    (r"alexnet", ("features.1", "features.4", "features.11", "features.12")),
    (r"vgg16", ("features.15", "features.22", "features.29", "features.30")),
    (r"squeezenet1_0", ("features.5", "features.10", "features.12")),
    (r"densenet\d+", ("features.denseblock1", "features.denseblock2", "features.denseblock3", "features.norm5")),
    (r"inception_v3", ("Conv2d_4a_3x3", "Mixed_5d", "Mixed_6e", "Mixed_7c")),
    (r"googlenet", ("conv3", "inception3b", "inception4e", "inception5b")),
    (r"shufflenet_v2_.*", ("maxpool", "stage2", "stage3", "conv5")),
    (r"mobilenet_v2", ("features.3", "features.6", "features.13", "features.18")),
    (r"mobilenet_v3_small", ("features.1", "features.3", "features.8", "features.12")),
    (r"mobilenet_v3_large", ("features.3", "features.6", "features.12", "features.16")),
    (r"mnasnet.*", ("layers.8", "layers.9", "layers.11", "layers.16")),
    (r"efficientnet_b\d", ("features.2", "features.3", "features.5", "features.8")),
    (r"convnext_.*", ("features.1", "features.3", "features.5", "features.7")),
    (r"vit_.*", ("conv_proj", "encoder")),  # "encoder": the output tokens, class token dropped, as a (B, C, h, w) map
]

# Auxiliary classifiers that the encoder builds without (aux_logits=False); their weights are ignored on load.
_AUX_HEADS = {"inception_v3": ("AuxLogits",), "googlenet": ("aux1", "aux2")}

_PROBE_SIZE = {"inception_v3": 299}  # input side for the dry run that measures feature_info; 224 otherwise
_LARGEST_SEARCHED = 1024  # the search for an encoder's smallest input side gives up above this


@functools.lru_cache(maxsize=None)
def torchvision_names() -> tuple[str, ...]:
    """Names of the torchvision classification models."""
    return tuple(sorted(torchvision.models.list_models(module=torchvision.models)))


def encoder_names() -> list[str]:
    """All names build_encoder accepts: the registered built-ins and the torchvision classifiers."""
    return sorted(set(ENCODERS.names()) | set(torchvision_names()))


def build_encoder(name: str, *, weights: str | None = None, **kwargs: Any) -> nn.Module:
    """Build encoder ``name`` (built-in, torchvision or ``timm/<name>``) and load ``weights`` (see
    mtl.weights.load_weights)."""
    if name in ENCODERS:
        try:
            encoder = ENCODERS.get(name)(**kwargs)
        except TypeError as e:
            raise UserError(f"encoder {name!r}: {e}") from None
    elif name in torchvision_names():
        encoder = torchvision_encoder(name, **kwargs)
    elif name.startswith(TIMM_PREFIX):
        encoder = timm_encoder(name, smallest_input_size, **kwargs)
    else:
        close = difflib.get_close_matches(name, encoder_names(), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown encoder {name!r}.{hint} Built-in: {', '.join(ENCODERS.names())}; "
            f"or any torchvision classifier ({len(torchvision_names())} names, e.g. resnet18); "
            f"or timm/<name> with timm installed (pip install 'mtl[timm]')."
        )
    if weights is not None:
        load_weights(encoder, name, weights)
    return encoder


def stage_nodes(name: str) -> tuple[str, ...] | None:
    """The stage nodes chosen for torchvision model ``name``, or None when they are found by shape."""
    for pattern, nodes in _STAGE_NODES:
        if re.fullmatch(pattern, name):
            return nodes
    return None


class TorchvisionEncoder(DualGraphModule):
    """A torchvision classifier traced by torch.fx into an encoder; parameter names stay torchvision's."""

    _COPIED_ATTRS = (
        "name",
        "out_dim",
        "fixed_input_size",
        "removed_modules",
        "classifier_bias",
        "notes",
        "_probe_size",
        "_feature_info",
        "_min_input_size",
    )

    def __init__(
        self,
        traced: DualGraphModule,
        *,
        name: str,
        out_dim: int,
        fixed_input_size: tuple[int, int] | None,
        removed_modules: tuple[str, ...],
        classifier_bias: bool,
        notes: tuple[str, ...],
        probe_size: tuple[int, int],
    ) -> None:
        super().__init__(traced, traced.train_graph, traced.eval_graph, class_name=f"{name}_encoder")
        self.name = name
        self.out_dim = out_dim
        self.fixed_input_size = fixed_input_size
        # Torchvision modules dropped from the model (classifier layer, aux heads): their weights are skipped on load.
        self.removed_modules = removed_modules
        self.classifier_bias = classifier_bias  # whether the dropped classifier layer had a bias (a head copies it)
        self.notes = notes
        self._probe_size = probe_size
        self._feature_info: list[dict[str, Any]] | None = None
        self._min_input_size: int | None = None

    @property
    def feature_info(self) -> list[dict[str, Any]]:
        """One dict per stage: name, channels, reduction; measured once by a dry run."""
        if self._feature_info is None:
            self._feature_info = probe_feature_info(self, self._probe_size)
        return self._feature_info

    @property
    def min_input_size(self) -> int:
        """The smallest input side: the fixed size if there is one, else the smallest side at least the largest
        stage reduction on which the model runs (found by dry runs, once)."""
        if self._min_input_size is None:
            if self.fixed_input_size is not None:
                self._min_input_size = min(self.fixed_input_size)
            else:
                largest = max((f["reduction"] for f in self.feature_info), default=1)
                self._min_input_size = smallest_input_size(self, largest)
        return self._min_input_size

    def __deepcopy__(self, memo: dict[int, Any]) -> "TorchvisionEncoder":
        copied = super().__deepcopy__(memo)
        type(copied).__name__ = type(self).__name__
        for attr in self._COPIED_ATTRS:
            setattr(copied, attr, copy.deepcopy(getattr(self, attr), memo))
        # The base copy comes back all in train mode: restore the graph and every module's own mode.
        copied.train(self.training)
        for qualname, module in self.named_modules():
            copied.get_submodule(qualname).training = module.training
        return copied


def torchvision_encoder(name: str, **kwargs: Any) -> TorchvisionEncoder:
    """Build torchvision classifier ``name`` (random init) as an encoder; kwargs go to the model builder."""
    if name in _AUX_HEADS:
        kwargs["aux_logits"] = False
        kwargs.setdefault("init_weights", True)
        # What torchvision sets with its own weights; one fixed choice keeps every weights source consistent.
        kwargs.setdefault("transform_input", True)
    try:
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    except TypeError as e:
        raise UserError(f"encoder {name!r}: {e}") from None

    out_node, out_dim, classifier, bias = _drop_classifier(model, name)
    removed = (classifier,) + _AUX_HEADS.get(name, ())
    fixed = fixed_input_size(model)
    probe_size = fixed or (_PROBE_SIZE.get(name, 224),) * 2
    stages = stage_nodes(name) or _find_stages(model, probe_size, head=classifier.split(".")[0])

    return_nodes = {node: node for node in stages} | {out_node: "out"}
    # Modules that own buffers are called, not traced through: fx would copy what they compute from a buffer into
    # an anonymous constant (maxvit's relative_position_index), and torchvision's state dicts would not load.
    traced = create_feature_extractor(
        model,
        return_nodes=return_nodes,
        suppress_diff_warning=True,
        tracer_kwargs={"leaf_modules": _buffer_owners(model)},
    )
    if "encoder" in stages and name.startswith("vit_"):
        for graph in (traced.train_graph, traced.eval_graph):
            _tokens_as_map(graph, "encoder", grid="conv_proj")
    notes = ()
    if name in _AUX_HEADS:
        plural = "s" if len(_AUX_HEADS[name]) > 1 else ""
        transform = (
            "transform_input=True, as torchvision builds it for its ImageNet weights: inputs normalised with "
            "ImageNet's mean and std are re-normalised to [-1, 1] inside the model"
            if kwargs["transform_input"]
            else "transform_input=False (set in model.encoder_options)"
        )
        notes = (
            f"{name} is built without its auxiliary classifier{plural} ({', '.join(_AUX_HEADS[name])}) for "
            f"every model.weights, and with {transform}",
        )
    return TorchvisionEncoder(
        traced,
        name=name,
        out_dim=out_dim,
        fixed_input_size=fixed,
        removed_modules=removed,
        classifier_bias=bias,
        notes=notes,
        probe_size=probe_size,
    )


def fixed_input_size(model: nn.Module) -> tuple[int, int] | None:
    """(H, W) for torchvision models whose architecture takes one input size only, else None: a ViT (its
    position embeddings) and MaxViT (its attention grids, built for one size; the stem and the first block each
    halve the input)."""
    if isinstance(model, VisionTransformer):
        return (model.image_size, model.image_size)
    if isinstance(model, MaxVit):
        grid = model.blocks[0].grid_size
        return (4 * grid[0], 4 * grid[1])
    return None


def _buffer_owners(model: nn.Module) -> list[type]:
    """Module types outside torch.nn that own buffers themselves (torch.nn modules are fx leaves already)."""
    return sorted(
        {
            type(m)
            for m in model.modules()
            if not type(m).__module__.startswith("torch.nn") and any(True for _ in m.buffers(recurse=False))
        },
        key=lambda t: t.__qualname__,
    )


def _drop_classifier(model: nn.Module, name: str) -> tuple[str, int, str, bool]:
    """Replace the final classifier layer by nn.Identity; return (out node, out_dim, classifier module name,
    whether that layer had a bias)."""
    if name.startswith("squeezenet"):  # classifier = dropout, 1x1 conv, relu, pool; then torch.flatten
        conv = model.get_submodule("classifier.1")
        model.set_submodule("classifier.1", nn.Identity())
        return "flatten", conv.in_channels, "classifier.1", conv.bias is not None
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"torchvision model {name!r} has no final nn.Linear classifier; it cannot be an encoder")
    qualname, linear = linears[-1]
    model.set_submodule(qualname, nn.Identity())
    return qualname, linear.in_features, qualname, linear.bias is not None


def _find_stages(model: nn.Module, size: tuple[int, int], head: str) -> tuple[str, ...]:
    """For unknown families: the last trunk block producing a map at each reduction >= 4 (the same along both
    sides), by a dry run on a (1, 3, *size) input."""
    trunk = [n for n, _ in model.named_children() if n != head]
    trunk += [
        f"{n}.{c}"
        for n, m in model.named_children()
        if n != head and isinstance(m, nn.Sequential)
        for c, _ in m.named_children()
    ]
    last: dict[int, str] = {}

    def record(name: str, module: nn.Module, args: Any, out: Any) -> None:
        if (
            isinstance(out, Tensor)
            and out.dim() == 4
            and 2 <= out.shape[-2] < size[0]
            and not isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
        ):
            reduction = _reduction(size[0], out.shape[-2])
            if reduction >= 4 and reduction == _reduction(size[1], out.shape[-1]):
                last[reduction] = name

    handles = [model.get_submodule(n).register_forward_hook(functools.partial(record, n)) for n in trunk]
    try:
        with evaluating(model):
            model(_probe_input(model, size))
    finally:
        for h in handles:
            h.remove()
    return tuple(last[r] for r in sorted(last))


def _tokens_as_map(graph: torch.fx.Graph, key: str, grid: str) -> None:
    """Rewrite the output ``key`` (transformer tokens) into a map shaped like output ``grid``."""
    output = next(n for n in graph.nodes if n.op == "output")
    outputs = dict(output.args[0])
    with graph.inserting_before(output):
        outputs[key] = graph.call_function(tokens_to_map, (outputs[key], outputs[grid]))
    output.args = (outputs,)
    graph.lint()


def tokens_to_map(tokens: Tensor, grid: Tensor) -> Tensor:
    """(B, 1 + h*w, C) tokens with a leading class token -> (B, C, h, w), h and w taken from ``grid``."""
    return rearrange(tokens[:, 1:], "b (h w) c -> b c h w", h=grid.shape[-2], w=grid.shape[-1])


def probe_feature_info(encoder: nn.Module, size: int | tuple[int, int]) -> list[dict[str, Any]]:
    """Measure stage channels and reductions with one dry run on a (1, 3, size, size) or (1, 3, *size) input."""
    height = size if isinstance(size, int) else size[0]
    with evaluating(encoder):
        features = encoder(_probe_input(encoder, size))
    return [
        {"name": k, "channels": v.shape[1], "reduction": _reduction(height, v.shape[-2])}
        for k, v in features.items()
        if k != "out"
    ]


def smallest_input_size(encoder: nn.Module, start: int) -> int:
    """The smallest side >= ``start`` on which a dry run of ``encoder`` works and gives every stage map at least
    1x1 (sizes above one that works are assumed to work too)."""

    def runs(size: int) -> bool:
        try:
            with evaluating(encoder):
                features = encoder(_probe_input(encoder, size))
        except Exception:  # noqa: BLE001 - whatever a model raises on a too small input, it does not run
            return False
        return all(min(v.shape[-2:]) >= 1 for k, v in features.items() if k != "out")

    failed, size = start - 1, max(start, 1)
    while not runs(size):
        if size >= _LARGEST_SEARCHED:
            raise UserError(
                f"encoder {getattr(encoder, 'name', type(encoder).__name__)} runs on no square input "
                f"from {start} to {_LARGEST_SEARCHED} pixels a side"
            )
        failed, size = size, min(2 * size, _LARGEST_SEARCHED)
    while size - failed > 1:  # failed does not run, size runs
        middle = (failed + size) // 2
        failed, size = (failed, middle) if runs(middle) else (middle, size)
    return size


def input_size_problem(encoder: nn.Module, height: int, width: int) -> str | None:
    """What is wrong with (height, width) inputs for ``encoder`` (e.g. "takes only 224x224 images"), or None.
    Encoders without ``min_input_size`` (your own, see docs/extending.md) are taken at their word: any size."""
    fixed = getattr(encoder, "fixed_input_size", None)
    if fixed is not None:
        return None if (height, width) == tuple(fixed) else f"takes only {fixed[0]}x{fixed[1]} images"
    smallest = getattr(encoder, "min_input_size", None)
    if smallest is not None and min(height, width) < smallest:
        return f"needs images of at least {smallest}x{smallest}"
    return None


def check_input_size(encoder: nn.Module, height: int, width: int, given: str, fix: str = "") -> None:
    """Raise UserError, naming ``given`` (where the size comes from) and ``fix``, if ``encoder`` cannot take
    (height, width) inputs. The one rule used by training, ``mtl summary`` and ``mtl features``."""
    problem = input_size_problem(encoder, height, width)
    if problem is not None:
        name = getattr(encoder, "name", type(encoder).__name__)
        raise UserError(f"{given}: encoder {name} {problem}" + (f"; {fix}" if fix else ""))


def _reduction(size: int, side: int) -> int:
    return 2 ** round(math.log2(size / side))


def _probe_input(module: nn.Module, size: int | tuple[int, int]) -> Tensor:
    p = next(module.parameters(), None)
    height, width = (size, size) if isinstance(size, int) else size
    return torch.zeros(
        1, 3, height, width, device=p.device if p is not None else None, dtype=p.dtype if p is not None else None
    )


_NORMS = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(min(8, c), c), "none": lambda c: nn.Identity()}


def _conv_bn_relu(c_in: int, c_out: int, stride: int, norm: str = "batch") -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=norm == "none"), _NORMS[norm](c_out), nn.ReLU(inplace=True)
    )


@ENCODERS.register("small_cnn")
class SmallCNN(nn.Module):
    """A small conv net for CPU experiments: stages of conv-norm-ReLU blocks, each stage halving the resolution.

    ``norm``: ``batch`` (BatchNorm), ``group`` (GroupNorm, per sample: the same results whatever the batch is split
    into, e.g. over torchrun processes) or ``none``.
    """

    def __init__(
        self, widths: Sequence[int] = (32, 64, 128, 256), blocks: int = 2, in_channels: int = 3, norm: str = "batch"
    ) -> None:
        super().__init__()
        widths = list(widths)
        if not widths or any(not isinstance(w, int) or w < 1 for w in widths):
            raise UserError(f"small_cnn: widths must be a non-empty list of positive integers, got {widths!r}")
        if not isinstance(blocks, int) or blocks < 1:
            raise UserError(f"small_cnn: blocks must be a positive integer, got {blocks!r}")
        if norm not in _NORMS:
            raise UserError(f"small_cnn: norm must be one of {', '.join(_NORMS)}, got {norm!r}")
        self.name = "small_cnn"
        self.out_dim = widths[-1]
        self.min_input_size = 2 ** len(widths)  # every stage map at least 1x1
        self.fixed_input_size = None
        self.feature_info = [
            {"name": f"stage{i}", "channels": w, "reduction": 2**i} for i, w in enumerate(widths, start=1)
        ]
        self.removed_modules: tuple[str, ...] = ()
        c_in = in_channels
        for info in self.feature_info:
            c = info["channels"]
            layers = [_conv_bn_relu(c_in, c, 2, norm)] + [_conv_bn_relu(c, c, 1, norm) for _ in range(blocks - 1)]
            self.add_module(info["name"], nn.Sequential(*layers))
            c_in = c

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Stage maps and the globally averaged last map as "out"."""
        features = {}
        for info in self.feature_info:
            x = features[info["name"]] = self.get_submodule(info["name"])(x)
        features["out"] = reduce(x, "b c h w -> b c", "mean")
        return features
