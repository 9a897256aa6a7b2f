"""An encoder cut into its stages: modules that, run one after the other, give its stage maps.

Architectures that act between stages (cross-stitch units, PLE's levels, LTB's branching) need the encoder as a
chain ``stage_1, ..., stage_L``. Torchvision encoders are torch.fx graphs whose modules no longer run on their own,
so the chain is cut from the torchvision model itself, with the encoder's weights and ``requires_grad`` flags copied
by parameter name: the stage nodes (``layer1``..``layer4``, ``features.3``, ...) must be children of one module
whose children run in order from the input (the model itself or its ``features``/``layers``). Every chain is
checked against the encoder by a dry run before it is used. Supported: small_cnn and the torchvision families
``CHAIN_FAMILIES`` names; others (ViTs, Swin, MaxViT, Inception, GoogLeNet, RegNet) are refused in one line.
"""

from __future__ import annotations

import copy
import re
from typing import Any, List

import torch
import torchvision
from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.core.runtime import evaluating

CHAIN_FAMILIES = (
    r"resnet\d+|resnext.*|wide_resnet.*",
    r"vgg\d+(_bn)?|alexnet|squeezenet.*",
    r"mobilenet_v2|mobilenet_v3_.*|mnasnet.*|efficientnet_.*|convnext_.*|densenet\d+|shufflenet_v2_.*",
)
SUPPORTED = (
    "small_cnn, resnet/resnext/wide_resnet, vgg, alexnet, squeezenet, mobilenet, mnasnet, efficientnet, convnext, "
    "densenet, shufflenet_v2"
)


def stage_chain(encoder: nn.Module, arch: str, encoder_options: dict[str, Any] | None = None) -> nn.ModuleList:
    """The encoder's stages as a chain of modules (a fresh copy, weights and frozen flags as in ``encoder``)."""
    name = getattr(encoder, "name", type(encoder).__name__)
    if name == "small_cnn":
        chain = nn.ModuleList(copy.deepcopy(encoder.get_submodule(info["name"])) for info in encoder.feature_info)
    elif any(re.fullmatch(p, name) for p in CHAIN_FAMILIES) and name in torchvision.models.list_models():
        chain = _torchvision_chain(encoder, name, encoder_options or {})
    else:
        raise UserError(f"model.arch={arch} runs the encoder stage by stage, which supports {SUPPORTED}; not {name}")
    _check_chain(encoder, chain, arch)
    return chain


def _torchvision_chain(encoder: nn.Module, name: str, options: dict[str, Any]) -> nn.ModuleList:
    model = torchvision.models.get_model(name, weights=None, **options)
    nodes = [info["name"] for info in encoder.feature_info]
    # a stage found by shape may be a whole container (vgg11's last is "features"): the rest of it
    whole = nodes[-1] if len(nodes) > 1 and all(n.startswith(nodes[-1] + ".") for n in nodes[:-1]) else None
    parents = {n.rpartition(".")[0] for n in (nodes[:-1] if whole else nodes)}
    if len(parents) != 1 or (whole is not None and parents != {whole}):
        raise UserError(f"model.arch: the stages of {name} ({', '.join(nodes)}) do not share one parent module")
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    children = list(container.named_children())
    names = [c for c, _ in children]
    ends = [names.index(n.rpartition(".")[2]) for n in nodes[: len(nodes) - (whole is not None)]]
    if whole is not None:
        ends.append(len(children) - 1)
    chain, start = nn.ModuleList(), 0
    for end in ends:
        chain.append(nn.Sequential(*(m for _, m in children[start : end + 1])))
        start = end + 1
    if re.fullmatch(r"densenet\d+", name):  # its forward applies an in-place ReLU to norm5, the last stage map
        chain[-1].append(nn.ReLU())
    # the encoder's weights and frozen flags, by torchvision name (the chain's modules are the model's own)
    own = dict(model.named_parameters())
    state = encoder.state_dict()
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            if key in state:
                tensor.copy_(state[key])
    for key, p in encoder.named_parameters():
        if key in own:
            own[key].requires_grad_(p.requires_grad)
    return chain


def run_chain(chain: nn.ModuleList, x: Tensor) -> List[Tensor]:
    """The stage maps of input ``x``."""
    maps = []
    for stage in chain:
        x = stage(x)
        maps.append(x)
    return maps


def _check_chain(encoder: nn.Module, chain: nn.ModuleList, arch: str) -> None:
    """The chain must give the encoder's stage maps (eval mode, one small input)."""
    side = max(getattr(encoder, "min_input_size", 32), 32)
    fixed = getattr(encoder, "fixed_input_size", None)
    size = tuple(fixed) if fixed else (side, side)
    p = next(encoder.parameters())
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)
    with evaluating(encoder), evaluating(chain), torch.no_grad():
        want = [v for k, v in encoder(x).items() if k != "out"]
        got = run_chain(chain.to(p.device), x)
    if len(want) != len(got) or any(
        a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(want, got)
    ):
        name = getattr(encoder, "name", type(encoder).__name__)
        raise UserError(f"model.arch={arch}: {name} cannot be run stage by stage here; use one of {SUPPORTED}")
