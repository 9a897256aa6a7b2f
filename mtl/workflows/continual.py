"""Task-incremental continual learning: a sequence of tasks (the config's ``stages``) learnt by several methods.

After training task i, every task j <= i seen so far is evaluated: ``R[i][j]`` is the validation accuracy on
task j after task i. With T tasks:

    ACC = mean_j R[T-1][j]                         (average accuracy at the end)
    BWT = mean_{j < T-1} (R[T-1][j] - R[j][j])     (backward transfer; < 0 is forgetting; Lopez-Paz & Ranzato 2017)
    transfer_k = 100 * (R[k][k] - S_k) / S_k       (forward transfer for task k, in %)
    FWT = mean_{k >= 1} transfer_k

where ``S_k`` is the accuracy of an independent column trained on task k alone (the paper's baseline 1), so
FWT needs ``independent`` among the methods. Methods: ``progressive`` (Rusu et al. 2016), ``independent``,
``finetune`` (one encoder trained through the sequence, one head per task) and ``head_only`` (the encoder
trained on the first task, then frozen; a new head per task).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter

from mtl.build.data import build_data
from mtl.build.model import (
    build_head,
    check_data_size,
    config_encoder,
    model_input_size,
    parameter_counts,
)
from mtl.build.tasks import task_targets
from mtl.build.training import build_hooks, build_trainer, config_hooks
from mtl.config.load import dump_config
from mtl.config.schema import CONTINUAL_METHODS, Config, HeadCfg
from mtl.core.checkpoint import atomic_write, save_json
from mtl.core.errors import UserError
from mtl.core.runtime import seed_everything, select_device, use_amp
from mtl.engine.evaluate import evaluate
from mtl.models.encoders import build_encoder
from mtl.models.freezing import apply_freeze
from mtl.models.heads import POOLED, head_input
from mtl.models.progressive import ProgressiveNet
from mtl.models.transfer import TransferModel
from mtl.tasks.base import Task
from mtl.workflows.train import new_run_dir


@dataclass
class SequenceTask:
    """One task of the sequence: its stage config, task and loaders (shared by every method)."""

    cfg: Config
    task: Task
    loaders: Dict[str, DataLoader]
    generator: torch.Generator
    info: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.cfg.name


def _head(st: SequenceTask, in_dim: int) -> nn.Module:
    head_cfg = next(iter(st.cfg.tasks.values())).head or HeadCfg()
    message = f"stage {st.name!r}: continual methods need a pooled head (linear or mlp), not {head_cfg.name!r}"
    try:
        head = build_head(st.cfg, st.name, st.task, in_dim, feature_info=None)
    except UserError as e:
        if "feature_info" in str(e):
            raise UserError(message) from None
        raise
    if head_input(head) != POOLED:
        raise UserError(message)
    return head


class Learner:
    """A continual-learning method: the model trained on task k, and the model that predicts task j."""

    def train_model(self, k: int, st: SequenceTask) -> nn.Module:
        raise NotImplementedError

    def eval_model(self, j: int, st: SequenceTask) -> nn.Module:
        raise NotImplementedError

    def added_parameters(self, k: int, st: SequenceTask) -> int:
        """Parameters added for task k (a column with its laterals, or a head)."""
        raise NotImplementedError


class ColumnLearner(Learner):
    """``progressive`` (laterals on) or ``independent`` (laterals off): one column per task."""

    def __init__(self, lateral: bool, alpha: float, adapter_channels: Optional[int], device: torch.device) -> None:
        self.net = ProgressiveNet(alpha=alpha, lateral=lateral, adapter_channels=adapter_channels)
        self.device = device

    def train_model(self, k: int, st: SequenceTask) -> nn.Module:
        encoder = config_encoder(st.cfg)
        self.net.add_column(st.name, _head(st, encoder.out_dim), encoder=encoder)
        self.net.to(self.device)
        return self.net.view(st.name)

    def eval_model(self, j: int, st: SequenceTask) -> nn.Module:
        return self.net.view(st.name)

    def added_parameters(self, k: int, st: SequenceTask) -> int:
        return self.net.column_parameters(st.name)["total"]


class SharedEncoderLearner(Learner):
    """``finetune`` (the encoder keeps training) or ``head_only`` (frozen after the first task): a head per task."""

    def __init__(self, freeze_after_first: bool, device: torch.device) -> None:
        self.freeze_after_first = freeze_after_first
        self.encoder: Optional[nn.Module] = None
        self.heads: Dict[str, nn.Module] = {}
        self.device = device

    def train_model(self, k: int, st: SequenceTask) -> nn.Module:
        if self.encoder is None:
            self.encoder = config_encoder(st.cfg).to(self.device)
            apply_freeze(self.encoder, st.cfg.model.freeze)
        elif self.freeze_after_first:
            apply_freeze(self.encoder, "all")
        for head in self.heads.values():  # earlier heads keep what they learnt; only the encoder may drift
            head.requires_grad_(False)
        self.heads[st.name] = _head(st, self.encoder.out_dim).to(self.device)
        return TransferModel(self.encoder, {st.name: self.heads[st.name]})

    def eval_model(self, j: int, st: SequenceTask) -> nn.Module:
        return TransferModel(self.encoder, {st.name: self.heads[st.name]})

    def added_parameters(self, k: int, st: SequenceTask) -> int:
        head = sum(p.numel() for p in self.heads[st.name].parameters())
        return head + (sum(p.numel() for p in self.encoder.parameters()) if k == 0 else 0)


def build_learner(method: str, top: Config, device: torch.device) -> Learner:
    if method in ("progressive", "independent"):
        return ColumnLearner(method == "progressive", top.continual.alpha, top.continual.adapter_channels, device)
    return SharedEncoderLearner(method == "head_only", device)


def _accuracy(model: nn.Module, st: SequenceTask, device: torch.device, amp: bool) -> float:
    """Validation accuracy of ``model`` on task ``st``: the one evaluation loop (``mtl.engine.evaluate``)."""
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None
    return evaluate(model, st.loaders["val"], {st.name: st.task}, device, autocast=autocast).metrics[st.name]["acc"]


# --------------------------------------------------------------------------- metrics


def continual_metrics(R: List[List[float]], single: Optional[List[float]] = None) -> Dict[str, Any]:
    """ACC, BWT and (with the independent accuracies ``single``) per-task transfer and FWT, from ``R``."""
    T = len(R)
    final = R[-1]
    out: Dict[str, Any] = {
        "acc": sum(final) / T,
        "bwt": sum(final[j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0,
    }
    if single is not None:
        out["transfer"] = [100.0 * (R[k][k] - single[k]) / single[k] if single[k] else float("nan") for k in range(T)]
        out["fwt"] = sum(out["transfer"][1:]) / (T - 1) if T > 1 else 0.0
    return out


def results_table(tasks: List[str], results: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown: per method, final accuracy per task, ACC, BWT, FWT and parameters added per task."""
    header = ["method"] + [f"{t} acc" for t in tasks] + ["ACC", "BWT", "FWT %", "params per task"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method, r in results.items():
        cells = [method] + [f"{a:.4f}" for a in r["R"][-1]]
        cells += [f"{r['acc']:.4f}", f"{r['bwt']:+.4f}", f"{r['fwt']:+.2f}" if "fwt" in r else "n/a"]
        cells.append(" / ".join(f"{n:,}" for n in r["params_per_task"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(tasks: List[str], R: List[List[float]]) -> str:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for i, row in enumerate(R):
        lines.append(f"| {tasks[i]} | " + " | ".join(f"{a:.4f}" for a in row) + " |" + " |" * (len(tasks) - len(row)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- runner


def as_sequence_stage(cfg: Config) -> Config:
    """A stage config as the sequence trains it: its one task named after the stage, equal weighting."""
    cfg.tasks = {cfg.name: next(iter(cfg.tasks.values()))}
    cfg.weighting.name = "equal"
    return cfg


def stage_model(method: str, top: Config, configs: List[Config], tasks: List[Task], upto: int) -> nn.Module:
    """The architecture ``method`` predicts task ``upto`` with (no weights loaded): columns 0..upto with their
    laterals (earlier ones frozen) for column methods, the shared encoder with that task's head otherwise.
    ``configs`` are stage configs (``as_sequence_stage``), ``tasks`` their tasks."""
    if method not in CONTINUAL_METHODS:
        raise UserError(f"unknown continual method {method!r}; known: {', '.join(CONTINUAL_METHODS)}")
    learner = build_learner(method, top, torch.device("cpu"))
    model: Optional[nn.Module] = None
    for k in range(upto + 1):
        cfg = copy.deepcopy(configs[k])
        cfg.model.weights = None  # the architecture only: weights come from a checkpoint, or not at all
        model = learner.train_model(k, SequenceTask(cfg, tasks[k], {}, torch.Generator(), {}))
    assert model is not None
    return model


def prepare_sequence(configs: List[Config], device: torch.device) -> List[SequenceTask]:
    """Each stage's data and its single task, renamed to the stage's name."""
    sequence = []
    for cfg in configs:
        if len(cfg.tasks) != 1:
            raise UserError(
                f"stage {cfg.name!r}: a continual stage trains one task, but it has {len(cfg.tasks)} "
                f"({', '.join(cfg.tasks)}); set the others to null"
            )
        if (cfg.model.weights or "").startswith("stage:"):
            raise UserError(
                f"stage {cfg.name!r}: weights {cfg.model.weights!r}: continual methods build their own "
                "sequence; use null (random columns) or a pretrained weights name or file"
            )
        config_hooks(cfg)  # unknown train.hooks or options are refused here; each method and task builds its own
        as_sequence_stage(cfg)
        tasks, _, loaders, generator, info = build_data(cfg, device)
        task = tasks[cfg.name]
        if "acc" not in task.metric_directions:
            raise UserError(f"stage {cfg.name!r}: continual metrics need an accuracy; a {task.type_name} task has none")
        sequence.append(SequenceTask(cfg, task, loaders, generator, info))
        _head(sequence[-1], in_dim=8)  # refuse a dense or stage-map head before anything trains
    encoders = {(c.model.encoder, str(c.model.encoder_options)) for c in configs}
    if len(encoders) > 1:
        raise UserError(
            "continual stages must share one encoder architecture (model.encoder and encoder_options), "
            "since later columns read earlier ones"
        )
    with torch.random.fork_rng(devices=[]):  # the random initialisation leaves the training's draws as they were
        architecture = build_encoder(configs[0].model.encoder, **configs[0].model.encoder_options)
    for st in sequence:  # images the encoder cannot take are refused before anything is written
        check_data_size(st.cfg, architecture, model_input_size(st.loaders.get("val", st.loaders["train"])))
    return sequence


def run_continual(
    top: Config, configs: List[Config], quiet: bool = False, root: Optional[Path] = None
) -> Dict[str, Any]:
    """Train the task sequence with every ``continual.methods`` entry into ``<run>/<method>/<task>/`` (``<run>``:
    ``root``, or a new run directory)."""
    methods = top.continual.methods
    device = select_device(top.train.device)
    sequence = prepare_sequence(configs, device)
    names = [st.name for st in sequence]
    root = root or new_run_dir(top)
    atomic_write(root / "config.yaml", lambda tmp: dump_config(top, tmp))
    order = sorted(methods, key=lambda m: m != "independent")  # the FWT reference first
    results: Dict[str, Dict[str, Any]] = {}
    if not quiet:
        print(
            f"run {root}  |  continual: {', '.join(methods)} on {len(names)} tasks ({', '.join(names)})  |  "
            f"{top.model.encoder}  |  device {device}"
        )
    with SummaryWriter(str(root)) as tb:
        for method in order:
            results[method] = _run_method(method, top, sequence, device, root, tb, quiet)
        single = [results["independent"]["R"][k][k] for k in range(len(names))] if "independent" in results else None
        for method in order:
            results[method].update(continual_metrics(results[method]["R"], single))
            for key in ("acc", "bwt", "fwt"):
                if key in results[method]:
                    tb.add_scalar(f"continual/{key}/{method}", results[method][key], len(names))
    results = {m: results[m] for m in methods}
    table = results_table(names, results)
    matrices = "\n\n".join(
        f"R for {m} (rows: after training on; columns: evaluated on)\n\n{matrix_table(names, r['R'])}"
        for m, r in results.items()
    )
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(table + "\n\n" + matrices + "\n"))
    summary = {"run_dir": str(root), "tasks": names, "methods": results}
    save_json(summary, root / "summary.json")
    if not quiet:
        print("\n" + table + "\n\n" + matrices)
        print(f"\nwritten: {root / 'results.md'}, {root / 'summary.json'}; curves: tensorboard --logdir {root}")
    return summary


def _run_method(
    method: str, top: Config, sequence: List[SequenceTask], device: torch.device, root: Path, tb: Any, quiet: bool
) -> Dict[str, Any]:
    seed_everything(top.train.seed, top.train.deterministic)
    learner = build_learner(method, top, device)
    R: List[List[float]] = []
    params, times = [], []
    for k, st in enumerate(sequence):
        cfg = st.cfg
        if not quiet:
            print(f"\n=== {method}: task {k + 1}/{len(sequence)} {st.name} ===")
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        model = learner.train_model(k, st)
        run_dir = root / method / st.name
        run_dir.mkdir(parents=True)
        atomic_write(run_dir / "config.yaml", lambda tmp: dump_config(cfg, tmp))
        classes = {st.name: st.task.classes}
        meta = {
            "classes": classes,
            "method": method,
            "task": st.name,
            "targets": task_targets({st.name: st.task}),
            "sequence": [task_targets({s.name: s.task}) for s in sequence[: k + 1]],
        }
        hooks = build_hooks(
            cfg,
            run_dir,
            classes=classes,
            meta=meta,
            hparams={"method": method},
            n_images=0,
            quiet=quiet,
        )  # no unfreezing, no graph
        started = time.perf_counter()
        build_trainer(
            cfg, model, {st.name: st.task}, st.loaders, device=device, generator=st.generator, hooks=hooks, quiet=quiet
        ).fit()
        times.append(time.perf_counter() - started)
        params.append(learner.added_parameters(k, st))
        row = [
            _accuracy(learner.eval_model(j, sequence[j]), sequence[j], device, use_amp(cfg.train.amp, device))
            for j in range(k + 1)
        ]
        R.append(row)
        for j, acc in enumerate(row):
            tb.add_scalar(f"R/{method}/{sequence[j].name}", acc, k + 1)
        tb.add_scalar(f"average_acc/{method}", sum(row) / len(row), k + 1)
        save_json(
            {"method": method, "task": st.name, "R_row": row, "params": parameter_counts(model), "time_s": times[-1]},
            run_dir / "summary.json",
        )
    return {"R": R, "params_per_task": params, "time_s": times}
