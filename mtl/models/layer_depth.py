"""Layer-wise learning-rate decay: the depth of every encoder parameter and its learning-rate scale.

BEiT (Bao et al., "BEiT: BERT Pre-Training of Image Transformers", ICLR 2022, fine-tuning setup; as ELECTRA's
layer-wise decay and timm's ``param_groups_layer_decay``) scales the learning rate of layer ``l`` of an encoder with
``L`` blocks by ``decay ** (L + 1 - l)``: the stem (patch or stem convolution, class token, position embedding) is
layer 0, block ``i`` (in forward order) is layer ``i``, the last block ``L`` gets ``decay``, and everything after
the blocks (a final norm, the heads) ``L + 1``, scale 1.

The blocks of each family are named by one regular expression over torchvision's parameter names (``BLOCKS``, in
the manner of timm's ``group_matcher``): its matched prefix is the block. One rule turns it into depths for every
family: blocks count from 1 in the order their parameters are registered (the forward order, checked by a test per
family); parameters before the first block are the stem (0); a parameter between two blocks that matches none (a
downsampling or transition layer) starts the next block's stage and takes its depth (timm's convnext and swin put the
downsampling in the stage after it); those after the last block take ``L + 1``; a block whose parameters are all 1-D
(vgg_bn's BatchNorm, listed apart from its convolution) joins the block before it.
"""

from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Tuple

from torch import nn

from mtl.core.errors import UserError
from mtl.models.arch import Architecture

# (encoder family, block pattern). Blocks: residual/inverted-residual/transformer blocks where the family exposes
# them; the single conv or linear layers of vgg and alexnet (their first conv is the stem); the Fire modules of
# squeezenet; the Inception modules of googlenet and inception_v3.
BLOCKS: List[Tuple[str, str]] = [
    (r"small_cnn", r"stage(?!1\.0\.)\d+\.\d+"),  # stage1.0, the first strided conv, is the stem
    (r"resnet\d+|resnext.*|wide_resnet.*", r"layer\d+\.\d+"),
    (r"vgg\d+(_bn)?|alexnet", r"features\.(?![01]\.)\d+|classifier\.\d+"),
    (r"squeezenet.*", r"features\.(?!0\.)\d+"),
    (r"densenet\d+", r"features\.denseblock\d+\.denselayer\d+"),  # transitions start the next dense block
    (r"mobilenet_v2|mobilenet_v3_.*", r"features\.(?!0\.)\d+|classifier\.\d+"),
    (r"efficientnet_.*", r"features\.(?!0\.)\d+\.\d+"),
    (r"mnasnet.*", r"layers\.(?:[89]|1[0-3])\.\d+|layers\.1[45]"),  # layers.0-7: stem and its separable conv
    (r"regnet_.*", r"trunk_output\.block\d+\.block\d+-\d+"),
    (r"convnext_.*", r"features\.[1357]\.\d+"),  # features.2, .4, .6: downsampling, starting the next stage
    (r"shufflenet_v2_.*", r"stage\d\.\d+|conv5"),
    (r"googlenet", r"inception\d[a-e]"),
    (r"inception_v3", r"Mixed_\w+"),
    (r"vit_.*", r"encoder\.layers\.encoder_layer_\d+"),
    (r"swin_.*", r"features\.[1357]\.\d+"),  # features.2, .4, .6: patch merging, starting the next stage
    (r"maxvit_.*", r"blocks\.\d+\.layers\.\d+"),
]
SUPPORTED = (
    "small_cnn, resnet/resnext/wide_resnet, vgg, alexnet, squeezenet, densenet, mobilenet_v2/v3, efficientnet(_v2), "
    "mnasnet, regnet, convnext, shufflenet_v2, googlenet, inception_v3, vit, swin, maxvit"
)


def block_pattern(name: str) -> str:
    """The block pattern of encoder family ``name``; a one-line UserError for encoders without one."""
    for family, pattern in BLOCKS:
        if re.fullmatch(family, name):
            return pattern
    raise UserError(f"optim.layer_decay needs the encoder's block structure, known for {SUPPORTED}; not {name}")


def layer_depths(name: str, params: Sequence[Tuple[str, nn.Parameter]]) -> Tuple[Dict[str, int], int]:
    """``({parameter name: depth}, L)`` for the named parameters of encoder family ``name``, in registration order:
    0 the stem, 1..L the blocks, L + 1 what follows the last block (the rule in the module docstring)."""
    pattern = re.compile(block_pattern(name))
    keys: List[Optional[str]] = []
    for n, _ in params:
        m = pattern.match(n)
        keys.append(m.group(0) if m and n[m.end() : m.end() + 1] in (".", "") else None)
    depth: Dict[str, int] = {}
    for key in dict.fromkeys(k for k in keys if k is not None):  # blocks in order of appearance
        one_d = all(p.ndim <= 1 for k, (_, p) in zip(keys, params) if k == key)
        depth[key] = max(depth.values(), default=0) + (0 if one_d and depth else 1)
    last = max(depth.values(), default=0)
    out: Dict[str, int] = {}
    upcoming = last + 1  # walking backwards: the depth of the next block (L + 1 after the last)
    for (n, _), key in reversed(list(zip(params, keys))):
        if key is not None:
            upcoming = depth[key]
        out[n] = upcoming
    first = next((i for i, k in enumerate(keys) if k is not None), len(keys))
    for n, _ in params[:first]:
        out[n] = 0
    return out, last


def encoder_scales(encoder: nn.Module, decay: float) -> Dict[int, float]:
    """``{id(parameter): decay ** (L + 1 - depth)}`` for every parameter of ``encoder`` (BEiT's layer-wise scale)."""
    name = getattr(encoder, "name", type(encoder).__name__)
    params = list(encoder.named_parameters())
    own = getattr(encoder, "layer_depths", None)  # an encoder that numbers its own layers (timm's group_matcher)
    depths, last = own() if callable(own) else layer_depths(name, params)
    return {id(p): decay ** (last + 1 - depths[n]) for n, p in params}


def model_scales(model: nn.Module, decay: float) -> Dict[int, float]:
    """The layer scales of ``model``'s one encoder (``model.encoder``, or ``model.model.encoder`` when features are
    cached); parameters not listed (heads, MTAN's attention) keep scale 1. Architectures with several encoders or
    stage chains (``model.arch`` other than hard and mtan) are refused in one line."""
    inner = getattr(model, "model", model)
    encoder = getattr(inner, "encoder", None)
    if encoder is None:
        raise UserError("optim.layer_decay needs a model with one encoder (model.encoder); remove optim.layer_decay")
    if isinstance(encoder, Architecture):
        raise UserError(
            f"optim.layer_decay is not supported with model.arch={encoder.arch} (its encoders run as copies or "
            f"stage chains); use model.arch=hard or mtan, or remove optim.layer_decay"
        )
    return encoder_scales(encoder, decay)
