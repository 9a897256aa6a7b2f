"""Every config key, its type and its default. ``mtl.config`` validates YAML against these classes."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

AUGMENTATIONS = ("random_resized_crop", "random_crop", "none")
FreezeSpec = Union[str, List[str], Dict[str, Any]]


@dataclass
class DataCfg:
    """Where the images come from and how they are loaded."""

    name: str = "folder"  # a registered data set: folder, fashion_mnist, mnist, cifar10, cifar100, captcha_chars
    root: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)  # data-set specific keyword arguments
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    resize_size: int = 256
    augment: str = "random_resized_crop"  # random_resized_crop (+flip) | random_crop (+flip) | none
    crop_padding: int = 0  # random_crop: pixels of padding before the crop (the "pad-crop" augmentation)
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    labels_per_class: Optional[int] = None  # few-label training: a class-balanced subset of the train split
    batch_size: int = 32
    val_batch_size: Optional[int] = None
    num_workers: int = 2

    def check(self) -> str:
        if self.batch_size < 1:
            return f"data.batch_size must be >= 1, got {self.batch_size}"
        if self.labels_per_class is not None and self.labels_per_class < 1:
            return f"data.labels_per_class must be >= 1 or null, got {self.labels_per_class}"
        if self.augment not in AUGMENTATIONS:
            return f"data.augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"
        if len(self.mean) != 3 or len(self.std) != 3:
            return "data.mean and data.std need 3 values (R, G, B)"
        return ""


@dataclass
class HeadCfg:
    """The decoder that maps encoder features to one task's output."""

    name: str = "linear"  # linear | mlp
    hidden: int = 512  # mlp only
    dropout: float = 0.0


@dataclass
class TaskCfg:
    """One task: what it predicts, from which target key, with which head and loss weight."""

    type: str = "classification"  # classification (softmax + cross-entropy) | binary (one logit + BCE)
    target: str = "label"  # key of the data set's items that holds this task's target
    num_classes: Optional[int] = None  # inferred from the data; when set, it must match the data
    head: HeadCfg = field(default_factory=HeadCfg)
    weight: float = 1.0
    label_smoothing: float = 0.0


@dataclass
class ModelCfg:
    """The encoder, its weights and what of it is frozen."""

    encoder: str = "resnet18"  # any torchvision classification model, or small_cnn
    encoder_options: Dict[str, Any] = field(default_factory=dict)
    weights: Optional[str] = None  # null | DEFAULT | IMAGENET1K_V1 | path/to/file.pth | run:runs/<name>/<time>
    freeze: FreezeSpec = "none"  # none | all | {until: layer3} | {from: layer3} | {freeze: [...]} | {train: [...]}


@dataclass
class OptimCfg:
    """Optimizer and parameter groups."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = 0.001
    momentum: float = 0.9
    nesterov: bool = False
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    no_decay_norm_bias: bool = True  # no weight decay on normalisation weights and biases
    lr_mult: Dict[str, float] = field(default_factory=dict)  # {"encoder": 0.1}: longest matching prefix wins
    l2sp: float = 0.0  # L2-SP: alpha/2 * ||w - w_pretrained||^2 over the trained encoder weights


@dataclass
class SchedCfg:
    """Learning-rate schedule, stepped every iteration, defined in (fractional) epochs."""

    name: str = "step"  # step | multistep | cosine | onecycle | constant
    step_size: int = 7
    gamma: float = 0.1
    milestones: List[int] = field(default_factory=list)
    min_lr_ratio: float = 0.0  # cosine: final lr as a fraction of the base lr
    pct_start: float = 0.3  # onecycle
    div_factor: float = 25.0  # onecycle
    final_div_factor: float = 1e4  # onecycle
    warmup_epochs: float = 0.0  # linear warmup from 0, multiplied onto the schedule


@dataclass
class UnfreezeCfg:
    """At the start of ``epoch`` (0-based), unfreeze encoder modules matching ``modules``."""

    epoch: int
    modules: List[str]
    lr_mult: float = 1.0


@dataclass
class TrainCfg:
    """The training loop."""

    epochs: int = 25
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:1
    amp: str = "auto"  # auto (bf16 on GPUs that support it) | bf16 | off
    unfreeze: List[UnfreezeCfg] = field(default_factory=list)
    grad_clip: Optional[float] = None
    log_images: int = 16  # validation images in TensorBoard's prediction grid; 0 turns it off
    progress: bool = True

    def check(self) -> str:
        if self.epochs < 1:
            return f"train.epochs must be >= 1, got {self.epochs}"
        if self.amp not in ("auto", "bf16", "off"):
            return f"train.amp must be auto, bf16 or off, got {self.amp!r}"
        return ""


@dataclass
class Config:
    """A whole experiment. ``stages`` (optional) runs several configs in sequence, each a patch of this one."""

    name: str = "run"
    out_dir: str = "runs"
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    tasks: Dict[str, TaskCfg] = field(default_factory=lambda: {"label": TaskCfg()})
    optim: OptimCfg = field(default_factory=OptimCfg)
    sched: SchedCfg = field(default_factory=SchedCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    stages: List[Dict[str, Any]] = field(default_factory=list)

    def check(self) -> str:
        if not self.tasks:
            return "tasks must name at least one task"
        return ""
