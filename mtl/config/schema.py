"""Every config key, its type and its default. ``mtl.config`` validates YAML against these classes."""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import MISSING, dataclass, field
from typing import Any, Dict, List, Optional, Union

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

AUGMENTATIONS = ("random_resized_crop", "random_crop", "none")
FreezeSpec = Union[str, List[str], Dict[str, Any]]
DEVICES = "auto, cpu, cuda, cuda:N (GPU number N) or mps"
_DEVICE = re.compile(r"auto|cpu|mps|cuda(:[0-9]+)?")


def bounded(
    default: Any = MISSING,
    *,
    factory: Any = MISSING,
    ge: Optional[float] = None,
    gt: Optional[float] = None,
    le: Optional[float] = None,
    lt: Optional[float] = None,
    note: str = "",
) -> Any:
    """A number field (or list or mapping of numbers) that the config loader checks against these bounds; a
    value outside them is refused naming the key. ``note`` ends that message, e.g. what null means instead."""
    limits = {op: v for op, v in ((">=", ge), (">", gt), ("<=", le), ("<", lt)) if v is not None}
    return field(default=default, default_factory=factory, metadata={"bounds": limits, "note": note})


def name_problem(name: str) -> str:
    """Why ``name`` cannot be the folder that a run (or stage) writes into below its parent, or ""."""
    if name in ("", ".", "..") or any(c in name for c in "/\\\0"):
        return (
            f"name must be a plain folder name (no /, \\, not empty, . or ..), got {name!r}: runs go to "
            f"<out_dir>/<name>/<time>; to write somewhere else set out_dir"
        )
    return ""


@dataclass
class MixCfg:
    """Mixup / CutMix of each training batch (timm's Mixup, batch mode; defaults: the DeiT recipe). 0 turns one off."""

    mixup_alpha: float = bounded(0.8, ge=0)  # lam ~ Beta(a, a) of Mixup (Zhang et al. 2018)
    cutmix_alpha: float = bounded(1.0, ge=0)  # lam ~ Beta(a, a) of CutMix (Yun et al. 2019), corrected to the box
    prob: float = bounded(1.0, ge=0, le=1)  # the chance that a batch is mixed
    switch_prob: float = bounded(0.5, ge=0, le=1)  # the chance of CutMix instead of Mixup when both are on

    def check(self) -> str:
        if self.mixup_alpha == 0 and self.cutmix_alpha == 0:
            return (
                "data.mix.mixup_alpha and cutmix_alpha are both 0, which mixes nothing; set one of them > 0, "
                "or data.mix: null"
            )
        return ""


@dataclass
class DataCfg:
    """Where the images come from and how they are loaded."""

    name: str = "folder"  # a registered data set: folder, fashion_mnist, mnist, cifar10, cifar100, captcha_chars
    root: Optional[str] = None
    options: Dict[str, Any] = field(default_factory=dict)  # data-set specific keyword arguments
    train_split: str = "train"
    # a split name, or a fraction in (0, 1): that share of train_split becomes the validation set (class-stratified
    # for single-label data, eval transforms), drawn with split_seed; the rest stays training data
    val_split: Union[str, float] = "val"
    # the validation images drawn by a fraction val_split; independent of train.seed, so that every seed of a sweep
    # selects its checkpoint on the same images
    split_seed: int = bounded(0, ge=0, le=2**32 - 1)
    # a split evaluated once at the end, with the best-on-validation checkpoint and with the final weights
    # (summary.json "test"); null: none
    test_split: Optional[str] = None
    image_size: int = bounded(224, ge=1)
    resize_size: int = bounded(256, ge=1)
    augment: str = "random_resized_crop"  # random_resized_crop (+flip) | random_crop (+flip) | none
    crop_padding: int = bounded(0, ge=0)  # random_crop: pixels of padding before the crop (the "pad-crop" augmentation)
    # the horizontal flip (p 0.5) that both crop augmentations add to train images; false for digits, text and
    # other images whose mirror image is not one of their class (the crop draws stay the same either way)
    flip: bool = True
    # train images only, after crop + flip, on uint8 (torchvision's ClassificationPresetTrain order): null | trivial
    # (TrivialAugmentWide) | randaugment | augmix; every image draws its own ops and magnitudes in both pipelines
    auto_augment: Optional[str] = None
    # the policy's own settings, defaults as torchvision's (AUTO_AUGMENT_OPTIONS): e.g. randaugment {magnitude: 15}
    auto_augment_options: Dict[str, Any] = field(default_factory=dict)
    # train images only: the probability of erasing a random box (area 0.02-0.33 of the image, aspect 0.3-3.3) to
    # 0 after normalisation, as torchvision's RandomErasing in its reference presets
    random_erasing: float = bounded(0.0, ge=0, le=1)
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = bounded(factory=lambda: list(IMAGENET_STD), gt=0)
    labels_per_class: Optional[int] = None  # few-label training: a class-balanced subset of the train split
    classes: Optional[List[Union[int, str]]] = None  # only these classes (indices or names), relabelled 0..n-1
    batch_size: int = 32
    val_batch_size: Optional[int] = bounded(None, ge=1)
    num_workers: int = bounded(2, ge=0, note="0 loads in the main process")  # the per-item pipeline's loader processes
    # auto: batched when the data set has an image store (folder, fashion_mnist, mnist, cifar, captcha_chars, shapes):
    # images decoded once, whole batches cropped, flipped and normalised on the device; also scenes, multi_fashion
    # and celeba (images and targets gathered and augmented in batches) | batched | items (per item)
    pipeline: str = "auto"
    cache_size: Optional[int] = None  # side of the square each decoded image is stored at; null: 4/3 * resize_size
    cache_budget_gb: float = bounded(
        8.0, ge=0
    )  # decoded images above this go to a memory-mapped file instead of memory
    cache_dir: Optional[str] = None  # where that file goes; null: <data.root>/.mtl_cache
    # a fixed transformation of every input image of every split, after resize, crop and normalisation (domains of a
    # domain-incremental stream, mtl/data/shift.py): {permute: <seed>} (one pixel permutation) | {rotate: <degrees>}
    shift: Optional[Dict[str, Any]] = None
    # Mixup/CutMix of the training batches on the device, after the augmentation: null | {} (the defaults) |
    # {mixup_alpha, cutmix_alpha, prob, switch_prob}; classification, binary and multilabel tasks only
    mix: Optional[MixCfg] = None

    def check(self) -> str:
        if isinstance(self.val_split, float) and not 0 < self.val_split < 1:
            return (
                f"data.val_split must be a split name or a fraction in (0, 1) of the training split, "
                f"got {self.val_split:g}"
            )
        if self.test_split is not None and self.test_split in (self.val_split, self.train_split):
            which = "val_split" if self.test_split == self.val_split else "train_split"
            return (
                f"data.test_split {self.test_split!r} is also data.{which}: the test split must be images the run "
                f"neither trains nor selects on; carve validation from training data with data.val_split: 0.1"
            )
        if self.pipeline not in ("auto", "batched", "items"):
            return f"data.pipeline must be auto, batched or items, got {self.pipeline!r}"
        if self.cache_size is not None and self.cache_size < 1:
            return f"data.cache_size must be >= 1 or null, got {self.cache_size}"
        if self.batch_size < 1:
            return f"data.batch_size must be >= 1, got {self.batch_size}"
        if self.labels_per_class is not None and self.labels_per_class < 1:
            return f"data.labels_per_class must be >= 1 or null, got {self.labels_per_class}"
        if self.augment not in AUGMENTATIONS:
            return f"data.augment must be one of {', '.join(AUGMENTATIONS)}, got {self.augment!r}"
        if len(self.mean) != 3 or len(self.std) != 3:
            return "data.mean and data.std need 3 values (R, G, B)"
        return auto_augment_problem(self.auto_augment, self.auto_augment_options) or _shift_problem(self.shift)


# data.auto_augment policies and their options with torchvision's defaults (transforms.v2 TrivialAugmentWide,
# RandAugment and AugMix; the classification reference scripts' ra_magnitude 9 and augmix_severity 3 are the same)
AUTO_AUGMENT_OPTIONS: Dict[str, Dict[str, Any]] = {
    "trivial": {"num_magnitude_bins": 31},
    "randaugment": {"num_ops": 2, "magnitude": 9, "num_magnitude_bins": 31},
    "augmix": {"severity": 3, "mixture_width": 3, "chain_depth": -1, "alpha": 1.0, "all_ops": True},
}


def auto_augment_problem(policy: Optional[str], options: Dict[str, Any]) -> str:
    """Why ``policy`` with ``options`` is not a valid data.auto_augment / data.auto_augment_options, or ""."""
    if policy is None and options:
        return "data.auto_augment_options needs a data.auto_augment policy; set one or drop the options"
    if policy is None:
        return ""
    if policy not in AUTO_AUGMENT_OPTIONS:
        return f"data.auto_augment must be null or one of {', '.join(AUTO_AUGMENT_OPTIONS)}, got {policy!r}"
    known = AUTO_AUGMENT_OPTIONS[policy]
    for key, value in options.items():
        if key not in known:
            return f"unknown option data.auto_augment_options.{key} for {policy}; known: {', '.join(known)}"
        kind = bool if isinstance(known[key], bool) else int if isinstance(known[key], int) else (int, float)
        if isinstance(value, bool) != (kind is bool) or not isinstance(value, kind):
            return f"data.auto_augment_options.{key} must be a {type(known[key]).__name__}, got {value!r}"
    o = {**known, **options}
    bins = o.get("num_magnitude_bins", 2)
    limits = [
        ("num_magnitude_bins", bins >= 2, "an integer >= 2"),
        ("num_ops", o.get("num_ops", 0) >= 0, "an integer >= 0"),
        ("magnitude", 0 <= o.get("magnitude", 0) < bins, f"an integer from 0 to num_magnitude_bins - 1 = {bins - 1}"),
        ("severity", 1 <= o.get("severity", 1) <= 10, "an integer from 1 to 10"),
        ("mixture_width", o.get("mixture_width", 1) >= 1, "an integer >= 1"),
        ("alpha", 0 < o.get("alpha", 1.0) < math.inf, "a number > 0"),
    ]
    for key, fine, what in limits:
        if key in o and not fine:
            return f"data.auto_augment_options.{key} must be {what} for {policy}, got {o[key]!r}"
    return ""


def _shift_problem(shift: Optional[Dict[str, Any]]) -> str:
    """Why ``shift`` is not a valid data.shift (null, {permute: <seed>} or {rotate: <degrees>}), or ""."""
    if shift is None:
        return ""
    usage = "set data.shift to {permute: <seed>} or {rotate: <degrees>}, or null for none"
    unknown = [k for k in shift if k not in ("permute", "rotate")]
    if unknown:
        return f"data.shift has an unknown key {unknown[0]!r}; {usage}"
    if len(shift) != 1:
        merged = " (a stage's or task's shift merges into an inherited one unless it says _delete_: true)"
        return f"data.shift needs exactly one of permute and rotate{merged if shift else ''}; {usage}"
    ((kind, value),) = shift.items()
    if kind == "permute" and (isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**32):
        return f"data.shift.permute must be an integer seed from 0 to 2**32-1, got {value!r}; {usage}"
    if kind == "rotate" and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        return f"data.shift.rotate must be a number of degrees, got {value!r}; {usage}"
    return ""


@dataclass
class HeadCfg:
    """The decoder that maps encoder features to one task's output."""

    name: str = "linear"  # pooled: linear | mlp; dense (input-resolution maps): fpn | aspp
    hidden: int = bounded(512, ge=1)  # mlp only
    dropout: float = bounded(0.0, ge=0, lt=1)
    options: Dict[str, Any] = field(
        default_factory=dict
    )  # head-specific, e.g. fpn {channels: 128}, aspp {rates: [6, 12, 18]}


@dataclass
class TaskCfg:
    """One task: what it predicts, from which target key, with which head, loss and weight."""

    # classification | binary | multilabel | regression | segmentation | depth | normals;
    # null: the type the data set declares for the target (classification for single-label data sets)
    type: Optional[str] = None
    target: Optional[str] = None  # item key of the target; null: the task's name (``label`` for single-label data)
    num_classes: Optional[int] = bounded(
        None, ge=1
    )  # classes (or regression outputs); inferred from the data, checked when set
    head: Optional[HeadCfg] = None  # null: linear for image-level tasks, fpn for dense ones
    weight: float = bounded(1.0, ge=0)  # used by weighting static (and as pre-weights by methods that take them)
    loss: Optional[str] = None  # task types with a choice of loss, e.g. regression mse | l1 | smooth_l1
    metrics: Optional[List[str]] = None  # report only these metrics (all of the type's by default)
    label_smoothing: float = bounded(0.0, ge=0, lt=1)
    options: Dict[str, Any] = field(default_factory=dict)  # type-specific, e.g. classification {topk: 5}
    # multi-input runs: this task's own data set, a `data` mapping whose missing keys come from the top-level data
    # (root, options and classes only when it names the same data set); {}: the top-level data itself. Every task
    # has one or none does; each step draws one batch of every task (README: Multi-input multitask learning)
    data: Optional[Dict[str, Any]] = None


@dataclass
class ModelCfg:
    """The encoder, its weights and what of it is frozen."""

    encoder: str = "resnet18"  # any torchvision classification model, or small_cnn
    encoder_options: Dict[str, Any] = field(default_factory=dict)
    # how tasks share the encoder: hard (one shared encoder) | mtan (task attention per stage) | cross_stitch | mmoe
    #   | cgc | ple | dselect_k | ltb (see the README's architecture table)
    arch: str = "hard"
    arch_options: Dict[str, Any] = field(default_factory=dict)  # e.g. mmoe {num_experts: 4}
    weights: Optional[str] = None  # null | DEFAULT | IMAGENET1K_V1 | path/to/file.pth | run:runs/<name>/<time>
    freeze: FreezeSpec = "none"  # none | all | {until: layer3} | {from: layer3} | {freeze: [...]} | {train: [...]}
    # the momentum of every BatchNorm layer once built and loaded: running = (1 - m) * running + m * batch (PyTorch's
    # convention: a TensorFlow port's decay 0.99 is 0.01 here; PyTorch's default is 0.1); null keeps each layer's own
    bn_momentum: Optional[float] = bounded(None, gt=0, le=1, note="null keeps each layer's own momentum")


@dataclass
class OptimCfg:
    """Optimizer and parameter groups."""

    name: str = "sgd"  # sgd | adam | adamw
    lr: float = bounded(0.001, gt=0)
    momentum: float = bounded(0.9, ge=0)
    nesterov: bool = False
    betas: List[float] = bounded(factory=lambda: [0.9, 0.999], ge=0, lt=1)
    weight_decay: float = bounded(0.0, ge=0)
    no_decay_norm_bias: bool = True  # no weight decay on normalisation weights and biases
    # {"encoder": 0.1}: longest matching prefix wins
    lr_mult: Dict[str, float] = bounded(factory=dict, ge=0, note="0 keeps those weights fixed")
    l2sp: float = bounded(0.0, ge=0)  # L2-SP: alpha/2 * ||w - w_pretrained||^2 over the trained encoder weights
    # layer-wise lr decay (BEiT): encoder layer l of L blocks trains at lr * layer_decay ** (L + 1 - l) (stem 0, last
    # block L, heads L + 1); null: off. Typical: 0.65-0.75 for ViTs (mtl/models/layer_depth.py)
    layer_decay: Optional[float] = bounded(None, gt=0, le=1)


@dataclass
class SchedCfg:
    """Learning-rate schedule, stepped every iteration, defined in (fractional) epochs."""

    name: str = "step"  # step | multistep | cosine | onecycle | constant
    step_size: int = bounded(7, ge=1)
    gamma: float = bounded(0.1, gt=0)
    milestones: List[int] = bounded(factory=list, ge=0)
    min_lr_ratio: float = bounded(0.0, ge=0, le=1)  # cosine: final lr as a fraction of the base lr
    pct_start: float = bounded(0.3, ge=0, le=1)  # onecycle
    div_factor: float = bounded(25.0, gt=0)  # onecycle
    final_div_factor: float = bounded(1e4, gt=0)  # onecycle
    warmup_epochs: float = bounded(0.0, ge=0)  # linear warmup from 0, multiplied onto the schedule


@dataclass
class WeightingCfg:
    """How the task losses (or their gradients) are combined into one update."""

    # loss level: equal | static | uncertainty | dwa | gradnorm | rlw | geometric_mean | famo | scale_invariant | stch
    #   | auto_lambda (bilevel: a meta step on a reshuffled training batch before each step)
    # gradient level: mgda | pcgrad | gradvac | cagrad | imtl_g | imtl | nash_mtl | aligned_mtl | upgrad
    #   | dualproj | config | fairgrad | db_mtl | moco | excess_mtl | graddrop | modo | sdmgrad (these two: 3 batches
    #   per step)
    name: str = "equal"
    options: Dict[str, Any] = field(default_factory=dict)  # method-specific, e.g. cagrad {c: 0.4}
    grad_on: str = "params"  # gradient methods: params (shared encoder weights) | representation (encoder output)
    # removed: task weights are logged once per epoch, as their mean over the epoch's steps. Accepted with a warning,
    # so that the config.yaml of runs written before can still be read
    log_every: Optional[int] = field(default=None, metadata={"deprecated": True})

    def check(self) -> str:
        if self.grad_on not in ("params", "representation"):
            return f"weighting.grad_on must be params or representation, got {self.grad_on!r}"
        if self.log_every is not None:
            warnings.warn(
                "weighting.log_every is ignored: task weights are logged once per epoch (their mean over the "
                "epoch's steps, at x = epoch like every scalar); remove the key"
            )
        return ""


@dataclass
class UnfreezeCfg:
    """Unfreeze encoder modules matching ``modules`` at the start of ``epoch`` (0-based), or before training step
    ``step`` (0-based: once ``step`` updates are made); exactly one of the two."""

    modules: List[str]
    epoch: Optional[int] = bounded(None, ge=0)
    step: Optional[int] = bounded(None, ge=0)
    lr_mult: float = bounded(1.0, ge=0)

    def check(self) -> str:
        if (self.epoch is None) == (self.step is None):
            got = "both" if self.epoch is not None else "neither"
            return (
                f"a train.unfreeze event needs exactly one of epoch (0-based, at its start) and step (0-based, before "
                f"that training step), got {got}; e.g. {{epoch: 5, modules: [layer4]}} or {{step: 200, modules: "
                f"[layer4]}}"
            )
        return ""

    def at(self, per_epoch: int) -> int:
        """The training step (0-based) before which the event happens, with ``per_epoch`` steps in an epoch."""
        return self.step if self.step is not None else self.epoch * per_epoch


@dataclass
class HookCfg:
    """A trainer hook to add by name: mtl's own (early_stopping) or one a plugin registers in ``mtl.plugins.HOOKS``."""

    name: str
    options: Dict[str, Any] = field(default_factory=dict)  # the hook's keyword arguments, e.g. {patience: 3}


@dataclass
class CheckpointsCfg:
    """The weights a run keeps besides ``checkpoints/last.pt`` (the full state, to resume) and ``best.pt``."""

    # the k best epochs by train.monitor, each as checkpoints/top/epoch_NNNN.pt (1: best.pt only)
    keep_top_k: int = bounded(1, ge=1)
    every_n_epochs: Optional[int] = bounded(None, ge=1)  # also checkpoints/epoch_NNNN.pt every n epochs; null: none


@dataclass
class EarlyStopCfg:
    """Stop once train.monitor's score has not risen by more than ``min_delta`` for ``patience`` epochs."""

    patience: int = bounded(5, ge=1)
    min_delta: float = bounded(0.0, ge=0)


@dataclass
class EmaCfg:
    """An exponential moving average of the weights after every update (timm's ModelEmaV3, train.py --model-ema)."""

    decay: float = bounded(0.9998, ge=0, lt=1)  # timm train.py's --model-ema-decay default
    # timm's --model-ema-warmup: update n (1, 2, ...) uses min(decay, 1 - n**(-2/3)) instead of decay
    warmup: bool = False


@dataclass
class SwaCfg:
    """Stochastic weight averaging (Izmailov et al. 2018): the mean of the weights at the end of each epoch from
    ``start_epoch`` on, BatchNorm statistics recomputed at the end."""

    start_epoch: int = bounded(ge=0)  # 0-based: the weights after this epoch are the first averaged
    # from start_epoch on, each group's lr anneals (cosine, as torch's SWALR) to lr x the group's lr_mult over
    # anneal_epochs epochs, then stays there; null keeps sched's schedule
    lr: Optional[float] = bounded(None, gt=0, note="null keeps the schedule")
    anneal_epochs: float = bounded(1.0, ge=0)


@dataclass
class TrainCfg:
    """The training loop."""

    epochs: int = 25
    seed: int = bounded(0, ge=0, le=2**32 - 1)
    deterministic: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:1 | mps
    amp: str = "auto"  # auto (bf16 on GPUs that support it) | bf16 | off
    unfreeze: List[UnfreezeCfg] = field(default_factory=list)
    grad_clip: Optional[float] = bounded(None, gt=0, note="null turns clipping off")  # max gradient norm
    log_images: int = bounded(16, ge=0)  # validation images in TensorBoard's prediction grid; 0 turns it off
    log_graph: bool = False  # the model graph in TensorBoard's Graphs tab (traced once before training)
    progress: bool = True
    # the validation score that picks "best": auto (mean accuracy when every task has one, else delta_m with a
    # baseline, else -loss) | loss | delta_m | <task>.<metric>, e.g. seg.miou or depth.abs_err
    monitor: str = "auto"
    baseline: Optional[str] = None  # single-task baseline file ({task: {metric: value}}) for delta_m, relative to cwd
    nonfinite: str = "stop"  # a nan/inf training loss or gradient: stop (naming task and step) | skip (that step) | off
    channels_last: str = "auto"  # auto (= on) | on | off: NHWC memory format for models with convolutions
    compile: bool = False  # torch.compile the model (minutes of warm-up; pays off on long GPU runs)
    # frozen encoder with pooled heads only: compute the encoder's features once and train the heads on them.
    # auto: when data.augment is none | on (also with augmentation: feature_views fixed augmented views) | off
    cache_features: str = "auto"
    feature_views: int = 1  # cache_features on with augmentation: views per image, epoch e uses view e % views
    # more hooks, each a registered name or {name, options}, e.g. [{name: early_stopping, options: {patience: 3}}].
    # They run after mtl's own (unfreezing, metrics.jsonl, TensorBoard, checkpoints, console) and, unlike those
    # writers, on every process under torchrun, so that a hook that changes training changes it everywhere (one that
    # writes files checks mtl.core.distributed.is_main()); continual runs build them anew for each method and task.
    # An unknown name or option is refused before anything is written
    hooks: List[HookCfg] = field(default_factory=list)
    checkpoints: CheckpointsCfg = field(default_factory=CheckpointsCfg)
    early_stop: Optional[EarlyStopCfg] = None  # e.g. {patience: 5}: the early_stopping hook, by a key of its own
    # e.g. {decay: 0.9998}: validate the EMA weights too (val_ema), select on them, best.pt holds them
    ema: Optional[EmaCfg] = None
    swa: Optional[SwaCfg] = None  # e.g. {start_epoch: 15}: checkpoints/swa.pt; best.pt when it validates better
    # one optimizer update per this many consecutive training batches, as one batch of them all (loss-level
    # weightings whose total is affine in the task losses: equal, static, uncertainty, dwa)
    accumulate: int = bounded(1, ge=1)
    # the budget in training steps (optimizer updates: one per train.accumulate batches) instead of epochs: the run
    # walks ceil(steps / steps per epoch) epochs of the data, the last one cut short (and still validated), and
    # train.epochs is not used; the lr schedule spans these steps (sched.step_size, milestones, warmup_epochs and the
    # epochs of unfreeze, swa and checkpoints stay in epochs); null: train.epochs whole epochs
    steps: Optional[int] = bounded(None, ge=1, note="null trains train.epochs whole epochs")
    # validate every N-th epoch and always the last one; train.monitor, best.pt, keep_top_k, early stopping (patience
    # counts validated epochs) and ema's val_ema act on the validated epochs only
    val_every: int = bounded(1, ge=1)
    # after training: the running statistics of the trained BatchNorm layers of best.pt's weights recomputed over one
    # pass of the training split (as torch's update_bn), validated, saved as checkpoints/best_bn.pt and made best.pt
    # when they validate better (always without a validation split)
    bn_recompute: bool = False

    def check(self) -> str:
        if self.epochs < 1:
            return f"train.epochs must be >= 1, got {self.epochs}"
        if self.early_stop is not None and any(h.name == "early_stopping" for h in self.hooks):
            return "train.early_stop and the early_stopping hook in train.hooks both stop early; keep one of them"
        if not _DEVICE.fullmatch(self.device):
            return f"train.device must be {DEVICES}, got {self.device!r}"
        if self.amp not in ("auto", "bf16", "off"):
            return f"train.amp must be auto, bf16 or off, got {self.amp!r}"
        if self.nonfinite not in ("stop", "skip", "off"):
            return f"train.nonfinite must be stop, skip or off, got {self.nonfinite!r}"
        if self.channels_last not in ("auto", "on", "off"):
            return f"train.channels_last must be auto, on or off, got {self.channels_last!r}"
        if self.cache_features not in ("auto", "on", "off"):
            return f"train.cache_features must be auto, on or off, got {self.cache_features!r}"
        if self.feature_views < 1:
            return f"train.feature_views must be >= 1, got {self.feature_views}"
        if self.ema is not None and self.swa is not None:
            return "train.ema and train.swa both average the weights; keep one of them"
        if self.swa is not None and self.bn_recompute:
            return (
                "train.swa already recomputes the BatchNorm statistics of the weights it averages; "
                "set train.bn_recompute: false, or train.swa: null"
            )
        if self.swa is not None and self.steps is None and self.swa.start_epoch >= self.epochs:  # steps: when built
            return (
                f"train.swa.start_epoch is {self.swa.start_epoch} but the run has {self.epochs} epochs (0-based: the "
                f"last is {self.epochs - 1}), so nothing would be averaged; lower start_epoch or raise train.epochs"
            )
        return ""


# the built-in continual methods (mtl.workflows.learners.LEARNERS registers them, and plugins may add more; a test
# checks that the two agree)
CONTINUAL_METHODS = (
    "progressive",
    "independent",
    "finetune",
    "head_only",
    "ewc",
    "online_ewc",
    "si",
    "lwf",
    "er",
    "derpp",
    "agem",
)
CONTINUAL_SCENARIOS = ("task", "class", "domain")


@dataclass
class ContinualCfg:
    """Runs ``stages`` as a task sequence, one task per stage, with each method (a learner) in turn."""

    # progressive (a new column per task, laterals from the frozen earlier ones) | independent (a fresh column per
    # task, no laterals) | finetune (one encoder trained through the sequence) | head_only (the encoder trained on the
    # first task only, then frozen) | ewc | online_ewc | si | lwf (penalties) | er | derpp | agem (a sample memory).
    # Empty: stages run one by one.
    methods: List[str] = field(default_factory=list)
    # task: the task identity is given at test time (a head or column per task) | class: one head growing by each
    # task's classes, no task identity | domain: the same classes in every task, one head, no task identity
    scenario: str = "task"
    options: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # per method, e.g. {ewc: {lambda_: 100}}
    alpha: float = 0.1  # initial value of the learned scale on each lateral connection
    adapter_channels: Optional[int] = bounded(
        None, ge=1
    )  # 1x1 reduction width of the conv laterals; null: the new column's width
    # where a new column's encoder starts: config (model.weights: random when null, else that pretrained file) |
    # previous (a copy of the previous column's trained encoder; the first column from model.weights)
    column_init: str = "config"
    # rehearsal methods (er, derpp, agem): samples stored in all, shared by every past task; 200 is the smallest memory
    # of the DER paper's (Buzzega et al. 2020) and mammoth's Seq-MNIST / Seq-CIFAR-10 benchmarks (200, 500, 5120)
    buffer_size: int = bounded(200, ge=1)

    def check(self) -> str:
        if len(set(self.methods)) != len(self.methods):
            return "continual.methods lists a method twice"
        if self.scenario not in CONTINUAL_SCENARIOS:
            return f"continual.scenario must be one of {', '.join(CONTINUAL_SCENARIOS)}, got {self.scenario!r}"
        if self.column_init not in ("config", "previous"):
            return f"continual.column_init must be config or previous, got {self.column_init!r}"
        for name, options in self.options.items():
            if name not in self.methods:
                return (
                    f"continual.options.{name}: {name!r} is not in continual.methods "
                    f"({', '.join(self.methods) or 'empty'}); add it there or remove its options"
                )
            if not isinstance(options, dict):
                return f"continual.options.{name} must be a mapping of option: value, got {options!r}"
        return ""


LAUNCHERS = ("local", "submitit_local", "slurm")


@dataclass
class SlurmCfg:
    """``mtl sweep --launcher slurm``: the resources of each run's job (one job of an array per run)."""

    partition: Optional[str] = None
    gpus_per_node: int = bounded(1, ge=0)  # more than 1: the run is started under torchrun, one process per GPU
    cpus_per_task: Optional[int] = bounded(None, ge=1)
    mem_gb: Optional[float] = bounded(None, gt=0)
    time: int = bounded(60, ge=1)  # minutes; at the limit the run saves last.pt and mtl sweep --resume continues it
    array_parallelism: int = bounded(256, ge=1)  # runs of the array at a time
    extra: Dict[str, Any] = field(default_factory=dict)  # further sbatch parameters, e.g. {account: abc, qos: high}


@dataclass
class SweepCfg:
    """``mtl sweep``: a grid of overrides, each point trained once per seed. ``mtl train`` ignores this section."""

    seeds: List[int] = bounded(factory=list, ge=0, le=2**32 - 1)  # empty: train.seed only
    grid: Dict[str, List[Any]] = field(default_factory=dict)  # {optim.lr: [0.001, 0.003], weighting.name: [equal]}
    jobs: int = bounded(1, ge=1)  # local launcher: runs at a time
    launcher: str = "local"  # local | submitit_local | slurm
    slurm: SlurmCfg = field(default_factory=SlurmCfg)

    def check(self) -> str:
        if self.launcher not in LAUNCHERS:
            return f"sweep.launcher must be {', '.join(LAUNCHERS)}, got {self.launcher!r}"
        return ""


@dataclass
class Config:
    """A whole experiment. ``stages`` (optional) runs several configs in sequence, each a patch of this one."""

    name: str = "run"
    out_dir: str = "runs"
    imports: List[str] = field(default_factory=list)  # your modules that register parts (see docs/extending.md)
    data: DataCfg = field(default_factory=DataCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    # a task set to null is dropped, e.g. one task of an inherited config: `mtl train c.yaml tasks.depth=null`
    tasks: Dict[str, Optional[TaskCfg]] = field(default_factory=lambda: {"label": TaskCfg()})
    weighting: WeightingCfg = field(default_factory=WeightingCfg)
    optim: OptimCfg = field(default_factory=OptimCfg)
    sched: SchedCfg = field(default_factory=SchedCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    stages: List[Dict[str, Any]] = field(default_factory=list)
    continual: ContinualCfg = field(default_factory=ContinualCfg)
    sweep: Optional[SweepCfg] = None  # used by mtl sweep only

    def __post_init__(self) -> None:
        self.tasks = {name: task for name, task in self.tasks.items() if task is not None}

    @property
    def multi_input(self) -> bool:
        """Every task has its own data set (``tasks.<t>.data``)."""
        return any(task.data is not None for task in self.tasks.values())

    def check(self) -> str:
        if not self.tasks:
            return "tasks must name at least one task (all are null)"
        if self.multi_input:
            lacking = [name for name, task in self.tasks.items() if task.data is None]
            if lacking:
                given = ", ".join(f"tasks.{t}.data" for t in self.tasks if t not in lacking)
                return (
                    f"{given} is set but {', '.join(f'tasks.{t}.data' for t in lacking)} is not: in a multi-input "
                    f"run every task names its data set; set tasks.{lacking[0]}.data ({{}} takes the top-level "
                    f"data) or remove tasks.<t>.data everywhere"
                )
            if self.continual.methods:
                return "continual.methods runs one task per stage; it does not take tasks.<t>.data (multi-input)"
        if self.continual.methods and (self.train.ema is not None or self.train.swa is not None):
            which = "train.ema" if self.train.ema is not None else "train.swa"
            return f"{which} is not supported in continual runs (continual.methods); set it to null"
        if self.continual.methods and (self.model.bn_momentum is not None or self.train.bn_recompute):
            which = "model.bn_momentum" if self.model.bn_momentum is not None else "train.bn_recompute"
            return f"{which} is not supported in continual runs (continual.methods); remove it"
        if self.continual.methods and (self.data.mix is not None or self.train.accumulate > 1):
            key = "data.mix" if self.data.mix is not None else "train.accumulate"
            return (
                f"{key} is not supported with continual.methods (their penalties, replay buffers and projections "
                f"act on each step's own batch and labels); remove {key}"
            )
        return name_problem(self.name)
