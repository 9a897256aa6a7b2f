"""Task types, one class per file, each answering every question mtl asks about its kind of task (see ``base``);
the registries of task types, losses and metrics."""

from mtl.tasks.base import (
    LOSSES,
    METRICS,
    TASK_TYPES,
    Task,
    add_custom_metrics,
    build_task,
    num_outputs_required,
    probabilities,
    task_options,
    use_custom_loss,
)
from mtl.tasks.binary import Binary
from mtl.tasks.classification import Classification
from mtl.tasks.depth import Depth
from mtl.tasks.multilabel import Multilabel
from mtl.tasks.normals import Normals
from mtl.tasks.regression import Regression
from mtl.tasks.segmentation import Segmentation

__all__ = [
    "LOSSES",
    "METRICS",
    "TASK_TYPES",
    "Binary",
    "Classification",
    "Depth",
    "Multilabel",
    "Normals",
    "Regression",
    "Segmentation",
    "Task",
    "add_custom_metrics",
    "build_task",
    "num_outputs_required",
    "probabilities",
    "task_options",
    "use_custom_loss",
]
