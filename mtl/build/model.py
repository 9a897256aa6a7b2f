"""The model from the config: encoder, heads (through MTAN or another ``model.arch``), input-size checks."""

from __future__ import annotations

import inspect
from typing import Any, Dict, List, Optional, Sequence

from torch import nn

from mtl.config.schema import Config, HeadCfg
from mtl.core.errors import UserError
from mtl.data import DATASETS
from mtl.models.architectures import ARCHS, Architecture, arch_names
from mtl.models.encoders import build_encoder, check_input_size
from mtl.models.freezing import apply_freeze
from mtl.models.heads import DENSE, create_head, head_input
from mtl.models.mtan import MTAN
from mtl.models.transfer import TransferModel
from mtl.tasks.base import Task


def check_data_size(cfg: Config, encoder: nn.Module, input_size: List[int], key: str = "data") -> None:
    """Refuse images (``input_size``: the (H, W) the data gives the model) that the encoder cannot take; ``key``: the
    config section of ``cfg.data`` (a multi-input task's is ``tasks.<t>.data``)."""
    height, width = input_size
    if "augment" in inspect.signature(DATASETS.get(cfg.data.name)).parameters:  # sizes its own images
        given = f"data set {cfg.data.name} gives {height}x{width} images ({key}.image_size does not apply to it)"
        fix = f"change the image size in {key}.options if the data set has one, or choose another model.encoder"
    else:
        given = f"{key}.image_size={cfg.data.image_size}"
        fix = f"change {key}.image_size, or choose another model.encoder"
    check_input_size(encoder, height, width, given, fix)


def parameter_counts(model: nn.Module) -> Dict[str, int]:
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"total": n_params, "trainable": n_train, "frozen": n_params - n_train}


def build_model(
    cfg: Config,
    encoder: nn.Module,
    tasks: Dict[str, Task],
    input_size: Optional[Sequence[int]] = None,
    weights: bool = True,
) -> TransferModel:
    """Heads on the shared encoder, through MTAN attention with ``model.arch: mtan``, or on the features of a
    registered architecture (``mtl.models.arch``) built around ``encoder``. ``input_size``: the (H, W) of the images
    (gates of mixture-of-experts architectures read them whole); ``data.image_size`` when None. ``weights`` False:
    an architecture's further experts or columns get no ``model.weights`` either (as ``encoder``, the architecture
    only)."""
    mtan = None
    feature_info, in_dim = getattr(encoder, "feature_info", None), encoder.out_dim
    arch = cfg.model.arch
    if arch == "mtan":
        if not feature_info:
            raise UserError(f"model.arch=mtan needs an encoder with stage features; {cfg.model.encoder} has none")
        mtan = MTAN(feature_info, list(tasks))
        in_dim = mtan.out_dim
    elif arch in ARCHS:
        encoder = build_arch(cfg, encoder, list(tasks), input_size, weights)
        feature_info, in_dim = encoder.feature_info or None, encoder.out_dim
    elif arch != "hard":
        raise UserError(f"model.arch must be one of {', '.join(arch_names())}, got {arch!r}")
    elif cfg.model.arch_options:
        raise UserError(f"model.arch_options is for architectures other than {arch}; remove it or set model.arch")
    bias = mtan is None and arch == "hard" and getattr(encoder, "classifier_bias", True)
    heads = {
        name: build_head(cfg, name, task, in_dim, feature_info, classifier_bias=bias) for name, task in tasks.items()
    }
    return TransferModel(encoder, heads, mtan)


def build_arch(
    cfg: Config,
    encoder: nn.Module,
    tasks: List[str],
    input_size: Optional[Sequence[int]] = None,
    weights: bool = True,
) -> Architecture:
    """The architecture ``model.arch`` names, with ``model.arch_options``; its experts or columns are copies of
    ``encoder`` (more encoders like it are built from the config, with ``model.freeze`` applied)."""
    name = cfg.model.arch
    if cfg.model.freeze in ("all", True) and not cfg.train.unfreeze:
        raise UserError(
            f"model.arch={name} with model.freeze=all makes every expert or column the same frozen encoder; "
            f"freeze part of it (e.g. model.freeze={{until: ...}}) or use model.arch=hard"
        )
    if cfg.train.unfreeze:
        raise UserError(f"train.unfreeze is not supported with model.arch={name}; freeze with model.freeze only")
    if cfg.optim.l2sp > 0:
        raise UserError(f"optim.l2sp is not supported with model.arch={name} (it regularises one encoder)")
    weights_given = encoder  # the first copy keeps the weights already loaded

    def make_encoder() -> nn.Module:
        other = config_encoder(cfg, weights=weights)
        apply_freeze(other, cfg.model.freeze)
        return other.to(next(weights_given.parameters()).device)

    height, width = input_size if input_size is not None else (cfg.data.image_size, cfg.data.image_size)
    channels = cfg.model.encoder_options.get("in_channels", 3)
    cls = ARCHS.get(name)
    known = [p for p in inspect.signature(cls.__init__).parameters][5:]
    unknown = [k for k in cfg.model.arch_options if k not in known]
    if unknown:
        raise UserError(
            f"unknown option model.arch_options.{unknown[0]} for model.arch={name}; known: {', '.join(known) or 'none'}"
        )
    arch = cls(encoder, make_encoder, tasks, (channels, height, width), **cfg.model.arch_options)
    if hasattr(arch, "seed"):
        arch.seed = cfg.train.seed
    return arch


def config_encoder(cfg: Config, weights: bool = True) -> nn.Module:
    """The encoder ``model`` describes, with ``model.weights`` loaded (only its architecture when ``weights`` is
    False)."""
    return build_encoder(cfg.model.encoder, weights=cfg.model.weights if weights else None, **cfg.model.encoder_options)


def build_head(
    cfg: Config, name: str, task: Task, in_dim: int, feature_info: Optional[List[dict]], *, classifier_bias: bool = True
) -> nn.Module:
    """The head ``tasks.<name>.head`` describes for ``task`` (default: linear, or fpn for dense tasks), checked to
    fit the task: a dense task needs a dense head and an image-level task an image-level one. ``classifier_bias``
    False gives a linear head no bias, as the torchvision classifier layer it replaces (maxvit_t's)."""
    head_cfg = cfg.tasks[name].head or HeadCfg(name="fpn" if task.dense else "linear")
    options = dict(head_cfg.options)
    if head_cfg.name == "linear" and not classifier_bias:
        options.setdefault("bias", False)
    try:
        head = create_head(
            head_cfg.name,
            in_dim=in_dim,
            out_dim=task.out_dim,
            feature_info=feature_info,
            hidden=head_cfg.hidden,
            dropout=head_cfg.dropout,
            **options,
        )
        dense = head_input(head) == DENSE
    except UserError as e:
        raise UserError(f"tasks.{name}.head: {e}") from None
    if dense != task.dense:
        kind = "a dense (per-pixel) head such as fpn or aspp" if task.dense else "a pooled head such as linear or mlp"
        raise UserError(f"tasks.{name} is a {type(task).__name__.lower()} task and needs {kind}, not {head_cfg.name!r}")
    return head


def model_input_size(loader: Any) -> List[int]:
    """(H, W) of the images ``loader`` feeds the model (its first item, collated)."""
    return list(loader.collate_fn([loader.dataset[0]])["image"].shape[-2:])
