"""The BatchNorm layers of a built model: which of them keep running statistics while it trains, and their momentum
(``model.bn_momentum``)."""

from __future__ import annotations

from typing import List

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def batchnorm_layers(model: nn.Module) -> List[_BatchNorm]:
    """Every BatchNorm layer of ``model``: ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, their lazy forms and subclasses
    (timm's ``BatchNormAct2d``); not torchvision's ``FrozenBatchNorm2d``, which keeps no running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def set_bn_momentum(model: nn.Module, momentum: float) -> int:
    """Set the momentum of every BatchNorm layer of ``model`` (the encoder's and the heads') and return how many.

    PyTorch's convention (``torch.nn.BatchNorm2d``): each training batch updates
    ``running = (1 - momentum) * running + momentum * batch_statistic``. TensorFlow/Keras write the same update as
    ``running = decay * running + (1 - decay) * batch_statistic``, so a ported model's ``decay=0.99`` is
    ``momentum=0.01`` here, and PyTorch's default 0.1 lets the statistics follow the weights ten times faster.
    """
    layers = batchnorm_layers(model)
    for layer in layers:
        layer.momentum = momentum
    return len(layers)


def training_modes(model: nn.Module) -> List[bool]:
    """The ``training`` flag of each module of ``model`` (in ``model.modules()`` order) once ``model.train()`` has run:
    mtl's models keep their frozen parts in eval mode then. ``model``'s modes are left as they were."""
    before = [m.training for m in model.modules()]
    model.train(True)
    modes = [m.training for m in model.modules()]
    for module, mode in zip(model.modules(), before):
        module.training = mode
    return modes


def trained_bn_layers(model: nn.Module) -> List[_BatchNorm]:
    """The BatchNorm layers of ``model`` whose running statistics training updates: in training mode when the model
    trains (frozen ones stay in eval mode) and tracking running statistics."""
    return [
        m
        for m, mode in zip(model.modules(), training_modes(model))
        if mode and isinstance(m, _BatchNorm) and m.track_running_stats
    ]
