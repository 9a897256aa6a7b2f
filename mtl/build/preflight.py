"""What a run's config can be checked for before its data is read: a staged run checks every stage so before it
creates its run directory, so that a stage refused later does not leave a half-written run behind."""

from __future__ import annotations

import inspect

from mtl.build.data import check_data_options
from mtl.build.experiment import _check_accumulate
from mtl.build.model import check_data_size, config_encoder
from mtl.build.training import config_hooks
from mtl.config.load import task_configs
from mtl.config.schema import Config
from mtl.core.errors import UserError
from mtl.data import DATASETS
from mtl.engine.monitor import load_baseline
from mtl.models.freezing import apply_freeze, check_unfreeze
from mtl.models.heads import HEADS
from mtl.weighting import build_weighting


def check_before_data(cfg: Config) -> None:
    """Refuse ``cfg``, with the one-line UserError its run would give later, for what shows without its data: the
    data set's name and options; the encoder, its options and ``model.weights`` (loaded; not a ``stage:<name>``,
    which is not trained yet); ``model.freeze`` and ``train.unfreeze``; ``data.image_size`` for the encoder (data sets
    that size their own images excepted); head names; the weighting and its options with ``train.accumulate``;
    ``train.hooks`` and ``train.early_stop``; the ``train.baseline`` file. What needs the data's targets (class
    counts, ``train.monitor``'s metric, ``data.mix``) is left to the run."""
    inputs = task_configs(cfg) or {"data": cfg}
    for one in inputs.values():
        check_data_options(one.data)
    weights = cfg.model.weights or ""
    encoder = config_encoder(cfg, weights=not weights.startswith("stage:"))
    for key, one in inputs.items():
        if "augment" not in inspect.signature(DATASETS.get(one.data.name)).parameters:  # sizes set by the config
            size = one.data.image_size
            check_data_size(one, encoder, [size, size], key if key == "data" else f"tasks.{key}.data")
    apply_freeze(encoder, cfg.model.freeze)
    if cfg.train.steps is None and all(getattr(e, "step", None) is None for e in cfg.train.unfreeze):
        check_unfreeze(encoder, cfg.train.unfreeze, cfg.train.epochs, cfg.model.freeze)  # steps need the data's size
    for name, task in cfg.tasks.items():
        if task.head is not None and task.head.name not in HEADS:
            try:
                HEADS.get(task.head.name)  # the registry's line, with the close names
            except UserError as e:
                raise UserError(f"tasks.{name}.head: {e}") from None
    weighting = build_weighting(
        cfg.weighting.name, list(cfg.tasks), [t.weight for t in cfg.tasks.values()], **cfg.weighting.options
    )
    _check_accumulate(cfg, weighting)
    config_hooks(cfg)
    if cfg.train.baseline is not None:
        load_baseline(cfg.train.baseline)
