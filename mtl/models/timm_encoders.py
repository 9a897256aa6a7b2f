"""timm encoders: ``model.encoder: timm/<name>``, an optional extra (``pip install 'mtl[timm]'``).

The encoder is the timm model itself, built by ``timm.create_model(name, num_classes=0, **encoder_options)`` (no
classifier), with mtl's encoder interface mixed into its class. So every parameter and buffer keeps timm's name:
freeze specs (``{until: stages.2}``), unfreeze events and weight files use timm's module names. ``forward`` runs
timm's ``forward_intermediates`` (the stage maps, NCHW, and the final features in one pass) and then
``forward_head(pre_logits=True)`` on the final features: "out" is the pooled vector timm's classifier would read.
Stages are the last entry of timm's ``feature_info`` at each reduction of 4 or more (the stride-2 stem is left out,
as for torchvision encoders; a ViT has one stage, its last block). Layer-wise lr decay takes the depths from timm's
own ``group_matcher``, as timm's ``param_groups_layer_decay``.

Weights (read by mtl.models.weights): ``DEFAULT`` (the name's pretrained tag, timm's default one when the name
has none) or another tag of the same architecture is read from the Hugging Face cache (``$HF_HUB_CACHE``, else
``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``) or, for weights timm fetches by URL, torch.hub's cache; mtl
never downloads them.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any, Callable, Dict, List, Optional, Tuple

from torch import Tensor, nn

from mtl.core.errors import UserError
from mtl.models.weights import TIMM_PREFIX as PREFIX
from mtl.models.weights import import_timm

_HEAD = "__mtl_head__"  # a parameter name no group_matcher matches: the place of the (removed) classifier


class TimmEncoder(nn.Module):
    """mtl's encoder interface over a timm model; mixed into the model's own class by ``timm_encoder``."""

    name: str
    out_dim: int
    fixed_input_size: Optional[Tuple[int, int]]
    removed_modules: Tuple[str, ...]
    notes: Tuple[str, ...]
    feature_info: List[Dict[str, Any]]
    timm_feature_info: List[Dict[str, Any]]
    _stage_indices: List[int]
    _min_input_size: Optional[int]
    _smallest_input_size: Callable[[nn.Module, int], int]  # encoders.smallest_input_size

    def forward(self, x: Tensor) -> Dict[str, Tensor]:  # type: ignore[override]
        """Stage maps by name and the pooled pre-logits features as "out"."""
        final, maps = self.forward_intermediates(x, indices=self._stage_indices, intermediates_only=False)
        features = {info["name"]: m for info, m in zip(self.feature_info, maps)}
        features["out"] = self.forward_head(final, pre_logits=True)
        return features

    @property
    def min_input_size(self) -> int:
        """The fixed side if there is one, else the smallest side from the largest stage reduction up on which the
        model runs (dry runs, once), as for torchvision encoders."""
        if self._min_input_size is None:
            if self.fixed_input_size is not None:
                self._min_input_size = min(self.fixed_input_size)
            else:
                largest = max((f["reduction"] for f in self.feature_info), default=1)
                self._min_input_size = self._smallest_input_size(self, largest)
        return self._min_input_size

    def layer_depths(self) -> Tuple[Dict[str, int], int]:
        """``({parameter name: depth}, L)`` from timm's ``group_matcher(coarse=False)``, numbered as timm's
        ``param_groups_layer_decay`` numbers a model with its classifier: the stem 0, blocks 1..L in timm's grouping,
        the classifier's place L + 1 (so the scale ``decay ** (L + 1 - depth)`` is timm's)."""
        matcher = getattr(self, "group_matcher", None)
        if matcher is None:
            raise UserError(f"optim.layer_decay needs timm's group_matcher, which {self.name} lacks")
        from timm.models._manipulate import group_with_matcher

        names = [n for n, _ in self.named_parameters()] + [_HEAD]
        groups = group_with_matcher(((n, None) for n in names), matcher(coarse=False), reverse=True)
        head = groups.pop(_HEAD)
        return groups, head - 1


_CLASSES: Dict[type, type] = {}


def _encoder_class(cls: type) -> type:
    """``cls`` with TimmEncoder's interface first in its MRO; one class per timm class, importable by name."""
    if cls not in _CLASSES:
        name = f"Timm{cls.__name__}Encoder"
        _CLASSES[cls] = type(name, (TimmEncoder, cls), {"__module__": __name__, "__qualname__": name})
        setattr(sys.modules[__name__], name, _CLASSES[cls])  # so that pickle finds it
    return _CLASSES[cls]


def timm_encoder(name: str, smallest_input_size: Callable[[nn.Module, int], int], **options: Any) -> TimmEncoder:
    """Build ``timm/<arch>`` (random init, no classifier) as an encoder; ``options`` go to timm.create_model.
    ``smallest_input_size(encoder, start)``: the dry-run search of mtl.models.encoders (which imports this module)."""
    timm = import_timm(name)
    arch = name[len(PREFIX) :]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=3)
        hint = f" Did you mean {', '.join(PREFIX + c for c in close)}?" if close else ""
        raise UserError(f"unknown timm model {arch!r} in model.encoder={name}.{hint} See timm.list_models()")
    if "num_classes" in options or "features_only" in options or "pretrained" in options:
        raise UserError(
            f"model.encoder_options for {name}: num_classes, features_only and pretrained are set by mtl "
            f"(the heads are mtl's; weights come from model.weights); remove them"
        )
    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **options)
    except TypeError as e:
        raise UserError(f"encoder {name!r}: {e}") from None
    if not hasattr(model, "forward_intermediates"):
        raise UserError(
            f"timm model {arch} has no forward_intermediates, so mtl cannot read its stage maps; choose another"
        )
    timm_info = [dict(f) for f in model.feature_info]
    last: Dict[int, int] = {}  # reduction -> index of its last feature_info entry
    for i, f in enumerate(timm_info):
        if f["reduction"] >= 4:
            last[f["reduction"]] = i
    indices = [last[r] for r in sorted(last)]
    classifier = model.pretrained_cfg.get("classifier") or ()
    patch_embed = getattr(model, "patch_embed", None)
    strict = patch_embed is not None and getattr(patch_embed, "strict_img_size", False)  # position embeddings
    fixed = tuple(patch_embed.img_size) if strict else None
    model.__class__ = _encoder_class(type(model))
    model.name = name
    model.out_dim = getattr(model, "head_hidden_size", None) or model.num_features
    model.fixed_input_size = fixed
    model.removed_modules = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    model.notes = ()
    model.timm_feature_info = timm_info  # timm's own, all entries; forward_intermediates does not read it
    model.feature_info = [
        {"name": timm_info[i]["module"], "channels": timm_info[i]["num_chs"], "reduction": timm_info[i]["reduction"]}
        for i in indices
    ]
    model._stage_indices = indices
    model._min_input_size = None
    model._smallest_input_size = smallest_input_size
    return model
