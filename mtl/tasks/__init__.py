"""Task types: what a head outputs, its loss, its on-device metrics, and the registries of losses and metrics."""
from mtl.tasks.base import (LOSSES, METRICS, TASK_TYPES, Binary, Classification, Depth, Multilabel, Normals,
                            Regression, Segmentation, Task, add_custom_metrics, build_task, num_outputs_required,
                            probabilities, task_options, use_custom_loss)

__all__ = ["LOSSES", "METRICS", "TASK_TYPES", "Binary", "Classification", "Depth", "Multilabel", "Normals", "Regression",
           "Segmentation", "Task", "add_custom_metrics", "build_task", "num_outputs_required", "probabilities",
           "task_options", "use_custom_loss"]
