"""Task heads: decoders from the encoder's features to one task's output.

Every builder takes ``in_dim, out_dim, feature_info, hidden, dropout, **options`` (unknown options are a UserError)
and returns a module whose class declares ``input``: how the model calls it (``head_input`` reads the declaration,
``call_head`` calls the head). ``"pooled"`` heads (``linear``, ``mlp``) map ``(B, in_dim) -> (B, out_dim)``;
``"features"`` heads, image-level heads that need the stage maps rather than the pooled vector (``grid``), map
``features: {stage: (B, C, h, w), ..., "out"} -> (B, out_dim)``; ``"dense"`` heads (``fpn``, ``aspp``) map
``(features, size) -> (B, out_dim, *size)``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, ClassVar, Dict, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.segmentation.deeplabv3 import ASPP

from mtl.core.errors import UserError
from mtl.core.registry import Registry

HEADS = Registry("head")

NORMS = ("gn", "bn")

POOLED, FEATURES, DENSE = "pooled", "features", "dense"
HEAD_INPUTS = (POOLED, FEATURES, DENSE)


def head_input(head: nn.Module) -> str:
    """How ``head`` is called: POOLED, FEATURES or DENSE, as its ``input`` declares; the one place that reads it.

    A head that declares no ``input`` (a plugin written before it) is read the legacy way, here only: ``dense = True``
    is DENSE, else ``takes_features = True`` is FEATURES, else POOLED. ``input`` is read statically, so a submodule
    named ``input`` (``self.input = nn.Linear(...)``) is not taken for a declaration.
    """
    declared = inspect.getattr_static(head, "input", None)
    if declared is None:
        if getattr(head, "dense", False):
            return DENSE
        return FEATURES if getattr(head, "takes_features", False) else POOLED
    if not isinstance(declared, str) or declared not in HEAD_INPUTS:
        raise UserError(
            f"head {type(head).__name__}: input must be 'pooled', 'features' or 'dense', got {declared!r}; "
            "set the class attribute input to one of them"
        )
    return declared


def call_head(head: nn.Module, kind: str, features: Dict[str, Tensor], size: Tuple[int, int]) -> Tensor:
    """``head``'s output for the encoder's ``features`` (dense outputs at ``size``), called as ``kind`` says."""
    if kind == DENSE:
        return head(features, size)
    return head(features) if kind == FEATURES else head(features["out"])


class PooledHead(nn.Sequential):
    """An nn.Sequential on the pooled features; parameter names are the plain Sequential's (``0.weight``...)."""

    input: ClassVar[str] = POOLED


def check_options(head: str, options: dict[str, Any], known: Sequence[str]) -> None:
    """Raise UserError for options that head ``head`` does not take."""
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = f"it takes {', '.join(known)}" if known else "it takes no options"
        raise UserError(f"head {head!r}: unknown option(s) {', '.join(unknown)}; {takes}")


BUILDER_ARGS = ("in_dim", "out_dim", "feature_info", "hidden", "dropout")  # what every head builder takes


def create_head(
    name: str,
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None,
    hidden: int,
    dropout: float,
    **options: Any,
) -> nn.Module:
    """The registered head ``name`` built with ``options``. A builder that names its options (a plugin's
    ``def cosine_head(*, in_dim, ..., scale=10.0)``) gets a UserError for any other one, naming those it takes;
    a builder with ``**options`` checks them itself, as the built-in heads do (``check_options``)."""
    builder = HEADS.get(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        check_options(name, options, [p for p in params if p not in BUILDER_ARGS])
    return builder(in_dim=in_dim, out_dim=out_dim, feature_info=feature_info, hidden=hidden, dropout=dropout, **options)


@HEADS.register("linear")
def linear_head(
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None = None,
    hidden: int = 0,
    dropout: float = 0.0,
    **options: Any,
) -> nn.Module:
    """A single linear layer, optionally after dropout (the tutorials' replaced ``fc``); ``hidden`` is unused.

    Option ``bias`` (default true; false where the encoder's own torchvision classifier layer has none, maxvit_t).
    """
    check_options("linear", options, ("bias",))
    bias = options.get("bias", True)
    if not isinstance(bias, bool):
        raise UserError(f"head 'linear': bias must be true or false, got {bias!r}")
    layers = [nn.Dropout(dropout)] if dropout > 0 else []
    return PooledHead(*layers, nn.Linear(in_dim, out_dim, bias=bias))


@HEADS.register("mlp")
def mlp_head(
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None = None,
    hidden: int = 512,
    dropout: float = 0.5,
    **options: Any,
) -> nn.Module:
    """Linear -> ReLU -> Dropout -> Linear."""
    check_options("mlp", options, ())
    return PooledHead(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class GridHead(nn.Module):
    """Keeps spatial position: one stage map average-pooled to a ``rows x cols`` grid, flattened, then dropout and a
    linear layer. For images where each output depends on where its object is (captcha characters, the left and right
    items of Multi-Fashion): global average pooling would give every such head the same, position-free vector."""

    input: ClassVar[str] = FEATURES

    def __init__(self, stage: dict, out_dim: int, bins: tuple[int, int] = (2, 2), dropout: float = 0.0) -> None:
        super().__init__()
        self.stage_name = stage["name"]
        self.pool = nn.AdaptiveAvgPool2d(tuple(bins))
        self.fc = nn.Sequential(
            nn.Flatten(),
            nn.Dropout(dropout) if dropout > 0 else nn.Identity(),
            nn.Linear(stage["channels"] * bins[0] * bins[1], out_dim),
        )

    def forward(self, features: dict[str, Tensor]) -> Tensor:
        return self.fc(self.pool(features[self.stage_name]))


@HEADS.register("grid")
def grid_head(
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None = None,
    hidden: int = 0,
    dropout: float = 0.0,
    **options: Any,
) -> nn.Module:
    """Grid-pooled linear head (see GridHead). ``hidden`` is unused.

    Options: ``bins`` ([rows, cols], or one number for a square grid; default [2, 2]; [1, 8] for a line of text),
    ``stage`` (the stage to pool, default the deepest).
    """
    check_options("grid", options, ("bins", "stage"))
    stage = options.get("stage")
    if stage is not None and not isinstance(stage, str):
        raise UserError(f"head 'grid': stage must be one stage name, got {stage!r}")
    info = _stages("grid", feature_info, None if stage is None else [stage])[-1]
    bins = options.get("bins", [2, 2])
    bins = [bins, bins] if isinstance(bins, int) and not isinstance(bins, bool) else bins
    if isinstance(bins, (str, bytes)) or not isinstance(bins, Sequence) or len(bins) != 2:
        raise UserError(f"head 'grid': bins must be [rows, cols] or one positive integer, got {options['bins']!r}")
    bins = (_positive_int("grid", "bins", bins[0]), _positive_int("grid", "bins", bins[1]))
    return GridHead(info, out_dim, bins, dropout)


def norm_layer(norm: str, channels: int) -> nn.Module:
    """BatchNorm2d, or GroupNorm (works at any batch size) with up to 32 groups of at least 4 channels."""
    if norm == "bn":
        return nn.BatchNorm2d(channels)
    groups = math.gcd(32, channels)
    while groups > 1 and channels // groups < 4:
        groups //= 2
    return nn.GroupNorm(groups, channels)


def conv_norm_relu(c_in: int, c_out: int, kernel: int, norm: str) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, bias=False), norm_layer(norm, c_out), nn.ReLU(inplace=True)
    )


def _stages(head: str, feature_info: list[dict] | None, stages: Sequence[str] | None) -> list[dict]:
    """The chosen entries of feature_info, shallow to deep (all when ``stages`` is None)."""
    if not feature_info:
        raise UserError(f"head {head!r} reads stage maps and needs an encoder with stage features (feature_info)")
    names = [info["name"] for info in feature_info]
    if stages is None:
        return list(feature_info)
    if isinstance(stages, str) or not stages:
        raise UserError(f"head {head!r}: stages must be a non-empty list of stage names from {', '.join(names)}")
    unknown = [s for s in stages if s not in names]
    if unknown:
        raise UserError(
            f"head {head!r}: unknown stage(s) {', '.join(map(str, unknown))}; the encoder has {', '.join(names)}"
        )
    return [info for info in feature_info if info["name"] in stages]


def _positive_int(head: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"head {head!r}: {key} must be a positive integer, got {value!r}")
    return value


def _norm(head: str, norm: Any) -> str:
    if norm not in NORMS:
        raise UserError(f"head {head!r}: norm must be one of {', '.join(NORMS)}, got {norm!r}")
    return norm


class FPNHead(nn.Module):
    """FPN decoder: 1x1 laterals, top-down nearest upsampling + add, 3x3 conv-norm-ReLU smoothing per level,
    all levels upsampled (bilinear) to the finest and summed, then dropout and a 1x1 classifier conv."""

    input: ClassVar[str] = DENSE

    def __init__(
        self, stages: list[dict], out_dim: int, channels: int = 128, norm: str = "gn", dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.stage_names = [info["name"] for info in stages]
        self.lateral = nn.ModuleList(nn.Conv2d(info["channels"], channels, 1) for info in stages)
        self.smooth = nn.ModuleList(conv_norm_relu(channels, channels, 3, norm) for _ in stages)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, out_dim, 1)

    def forward(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        laterals = [conv(features[name]) for conv, name in zip(self.lateral, self.stage_names)]
        for i in range(len(laterals) - 2, -1, -1):  # deep to shallow
            laterals[i] = laterals[i] + F.interpolate(laterals[i + 1], size=laterals[i].shape[-2:], mode="nearest")
        levels = [smooth(x) for smooth, x in zip(self.smooth, laterals)]
        finest = levels[0].shape[-2:]
        fused = torch.stack(
            [levels[0]] + [F.interpolate(x, size=finest, mode="bilinear", align_corners=False) for x in levels[1:]]
        ).sum(0)
        logits = self.classifier(self.dropout(fused))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@HEADS.register("fpn")
def fpn_head(
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None = None,
    hidden: int = 0,
    dropout: float = 0.0,
    **options: Any,
) -> nn.Module:
    """FPN decoder over the encoder stages (see FPNHead). ``hidden`` is unused.

    Options: ``channels`` (128, decoder width), ``stages`` (stage names, default all), ``norm`` ("gn" default, or "bn").
    """
    check_options("fpn", options, ("channels", "norm", "stages"))
    stages = _stages("fpn", feature_info, options.get("stages"))
    channels = _positive_int("fpn", "channels", options.get("channels", 128))
    return FPNHead(stages, out_dim, channels, _norm("fpn", options.get("norm", "gn")), dropout)


class ASPPHead(nn.Module):
    """DeepLabV3 decoder on one stage: torchvision's ASPP (1x1, atrous 3x3 per rate, image pooling; projection with
    dropout 0.5), a 3x3 conv-norm-ReLU, dropout and a 1x1 classifier.

    torchvision's image-pooling branch batch-normalises a 1x1 map, which cannot train at batch size 1; here that
    branch is pool -> 1x1 conv with bias -> ReLU (no norm), so any batch size (e.g. an epoch's last, single-image
    batch) trains. The projection after it still normalises all branches together.
    """

    input: ClassVar[str] = DENSE

    def __init__(
        self,
        stage: dict,
        out_dim: int,
        channels: int = 256,
        rates: Sequence[int] = (6, 12, 18),
        norm: str = "bn",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.stage_name = stage["name"]
        aspp = ASPP(stage["channels"], list(rates), out_channels=channels)
        pooling = aspp.convs[-1]
        pooling[1], pooling[2] = nn.Conv2d(stage["channels"], channels, 1), nn.Identity()
        if norm == "gn":
            for name, m in list(aspp.named_modules()):
                if isinstance(m, nn.BatchNorm2d):
                    aspp.set_submodule(name, norm_layer("gn", m.num_features))
        self.decoder = nn.Sequential(aspp, conv_norm_relu(channels, channels, 3, norm))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(channels, out_dim, 1)

    def forward(self, features: dict[str, Tensor], size: tuple[int, int]) -> Tensor:
        logits = self.classifier(self.dropout(self.decoder(features[self.stage_name])))
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@HEADS.register("aspp")
def aspp_head(
    *,
    in_dim: int,
    out_dim: int,
    feature_info: list[dict] | None = None,
    hidden: int = 0,
    dropout: float = 0.0,
    **options: Any,
) -> nn.Module:
    """DeepLabV3 ASPP decoder on the deepest stage (see ASPPHead). ``hidden`` is unused.

    Options: ``channels`` (256), ``rates`` ([6, 12, 18]: the paper's rates at output stride 16; double them at output
    stride 8, e.g. a dilated resnet; on small maps, such as 64x64 inputs, use small rates like [1, 2, 3]),
    ``stage`` (the stage to decode, default the deepest), ``norm`` ("bn" default, or "gn").
    """
    check_options("aspp", options, ("channels", "norm", "rates", "stage"))
    stage = options.get("stage")
    if stage is not None and not isinstance(stage, str):
        raise UserError(f"head 'aspp': stage must be one stage name, got {stage!r}")
    info = _stages("aspp", feature_info, None if stage is None else [stage])[-1]
    channels = _positive_int("aspp", "channels", options.get("channels", 256))
    rates = options.get("rates", [6, 12, 18])
    if isinstance(rates, (str, bytes)) or not isinstance(rates, Sequence) or not rates:
        raise UserError(f"head 'aspp': rates must be a non-empty list of positive integers, got {rates!r}")
    rates = [_positive_int("aspp", "rates", r) for r in rates]
    return ASPPHead(info, out_dim, channels, rates, _norm("aspp", options.get("norm", "bn")), dropout)
