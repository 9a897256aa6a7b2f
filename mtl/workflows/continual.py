"""Continual learning: a sequence of tasks (the config's ``stages``) learnt by several methods.

After training task i, every task j <= i seen so far is evaluated: ``R[i][j]`` is the validation accuracy on
task j after task i. Before training task i, its model (the earlier tasks' training plus task i's new column or
head, seeded) is evaluated on task i: ``R[i-1][i]``. Before training anything, the freshly initialised model
of each task (built with the same seeds: task k's are ``train.seed + k``) is evaluated on it: ``b_i``. With T tasks
(0-based):

    acc        = 1/T sum_i R[T-1][i]                              (Lopez-Paz & Ranzato 2017, GEM, eq. 1: ACC)
    bwt        = 1/(T-1) sum_{i<T-1} (R[T-1][i] - R[i][i])        (GEM eq. 2: BWT; < 0 is forgetting)
    fwt_gem    = 1/(T-1) sum_{i>=1} (R[i-1][i] - b_i)             (GEM eq. 3: FWT)
    forgetting = 1/(T-1) sum_{j<T-1} (max_{j<=l<T-1} R[l][j] - R[T-1][j])   (Chaudhry et al. 2018, RWalk: f_j, F)
    transfer_pnn_k = 100 (R[k][k] - S_k) / S_k                     (Rusu et al. 2016, progressive nets: transfer in %)
    transfer_pnn   = 1/(T-1) sum_{k>=1} transfer_pnn_k

where ``S_k`` is the accuracy of an independent column trained on task k alone (the progressive-nets paper's
baseline 1), so ``transfer_pnn`` needs ``independent`` among the methods. The methods are the registered learners
(``mtl.workflows.learners``: progressive and independent columns, finetune, head_only; ``regularization``: ewc,
online_ewc, si, lwf; ``rehearsal``: er, derpp, agem), in the scenario ``continual.scenario`` names. Every accuracy
is measured on the validation split and, with data.test_split, on the test split (``R_test`` and its metrics).
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import hparams

import mtl.workflows.regularization  # noqa: F401  (registers ewc, online_ewc, si, lwf)
import mtl.workflows.rehearsal  # noqa: F401  (registers er, derpp, agem)
from mtl.build.data import build_data
from mtl.build.experiment import build_monitor
from mtl.build.model import check_data_size, model_input_size, parameter_counts
from mtl.build.tasks import task_targets
from mtl.build.training import build_hooks, build_trainer, config_hooks
from mtl.config.load import dump_config
from mtl.config.schema import Config
from mtl.core.checkpoint import (
    atomic_write,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    save_json,
    set_rng_state,
)
from mtl.core.errors import UserError
from mtl.core.rundir import lock_run_dir
from mtl.core.runtime import memory_mark, seed_everything, select_device, training_memory, use_amp
from mtl.engine.evaluate import evaluate
from mtl.models.encoders import build_encoder
from mtl.tasks.base import Task
from mtl.workflows.learners import Learner, build_learner, pooled_head
from mtl.workflows.plots import MISSING, have_matplotlib, heatmap_chart, pareto_chart
from mtl.workflows.train import check_resumable, new_run_dir


@dataclass
class SequenceTask:
    """One task of the sequence: its stage config, task and loaders (shared by every method)."""

    cfg: Config
    task: Task
    loaders: Dict[str, DataLoader]
    generator: torch.Generator
    info: Dict[str, Any]
    monitor: Optional[Callable[[Dict[str, Any]], float]] = None  # train.monitor: the score that picks best.pt

    @property
    def name(self) -> str:
        return self.cfg.name


def _accuracy(
    model: nn.Module,
    st: SequenceTask,
    device: torch.device,
    channels_last: bool,
    task: Optional[Task] = None,
    split: str = "val",
) -> float:
    """Accuracy of ``model`` on task ``st``'s ``split`` (scored as ``task``, by default the stage's own): the one
    evaluation loop (``mtl.engine.evaluate``)."""
    amp = use_amp(st.cfg.train.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if amp else None
    result = evaluate(
        model, st.loaders[split], {st.name: task or st.task}, device, autocast=autocast, channels_last=channels_last
    )
    return result.metrics[st.name]["acc"]


# --------------------------------------------------------------------------- metrics


def continual_metrics(
    R: List[List[float]],
    single: Optional[List[float]] = None,
    before: Optional[List[float]] = None,
    random_init: Optional[List[float]] = None,
) -> Dict[str, Any]:
    """The metrics of the module docstring from the accuracy matrix ``R`` (row i: after task i, tasks 0..i):
    ``acc``, ``bwt`` and ``forgetting`` always; ``fwt_gem`` with ``before`` (``before[i]`` = R[i-1][i], the
    accuracy on task i just before training on it; ``before[0]`` is not used) and ``random_init`` (b_i);
    ``transfer_pnn`` (mean over tasks 1..T-1) and ``transfer_pnn_per_task`` with the independent accuracies
    ``single``."""
    T = len(R)
    final = R[-1]
    earlier = range(T - 1)
    out: Dict[str, Any] = {
        "acc": sum(final) / T,
        "bwt": sum(final[j] - R[j][j] for j in earlier) / (T - 1) if T > 1 else 0.0,
        "forgetting": sum(max(R[i][j] for i in range(j, T - 1)) - final[j] for j in earlier) / (T - 1)
        if T > 1
        else 0.0,
    }
    if before is not None and random_init is not None:
        out["fwt_gem"] = sum(before[i] - random_init[i] for i in range(1, T)) / (T - 1) if T > 1 else 0.0
    if single is not None:
        per_task = [100.0 * (R[k][k] - single[k]) / single[k] if single[k] else float("nan") for k in range(T)]
        out["transfer_pnn_per_task"] = per_task
        out["transfer_pnn"] = sum(per_task[1:]) / (T - 1) if T > 1 else 0.0
    return out


METRIC_COLUMNS = (("acc", "ACC"), ("bwt", "BWT"), ("fwt_gem", "FWT (GEM)"), ("forgetting", "forgetting"))


def split_view(r: Mapping[str, Any], split: str) -> Mapping[str, Any]:
    """A method's results as measured on ``split``: its R and metrics on it, with the split-free entries."""
    if split == "val":
        return r
    return {**r, **r[split], "R": r[f"R_{split}"]}


def results_table(tasks: List[str], results: Mapping[str, Mapping[str, Any]], split: str = "val") -> str:
    """Markdown: per method, final accuracy per task on ``split``, ACC, BWT, FWT (GEM), forgetting, the
    progressive-nets transfer in %, parameters added, training seconds and peak memory per task; a metric a method
    lacks is n/a."""
    header = ["method"] + [f"{t} acc" for t in tasks] + [title for _, title in METRIC_COLUMNS]
    header += ["transfer PNN %", "params per task", "train s per task", "peak MiB per task"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for method, r in results.items():
        r = split_view(r, split)
        cells = [method] + [f"{a:.4f}" for a in r["R"][-1]]
        cells += [f"{r[key]:+.4f}" if key in r else "n/a" for key, _ in METRIC_COLUMNS]
        cells[len(tasks) + 1] = f"{r['acc']:.4f}"  # an accuracy, not a difference
        cells.append(f"{r['transfer_pnn']:+.2f}" if "transfer_pnn" in r else "n/a")
        cells.append(" / ".join(f"{n:,}" for n in r["params_per_task"]))
        cells.append(" / ".join(f"{t:.0f}" for t in r.get("time_s", [])) or "n/a")
        peaks = [m.get("peak_mib") if isinstance(m, dict) else None for m in r.get("memory", [])]
        cells.append(" / ".join("n/a" if p is None else f"{p:.0f}" for p in peaks) or "n/a")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def matrix_table(tasks: List[str], R: List[List[float]]) -> str:
    lines = ["| after \\ on | " + " | ".join(tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for i, row in enumerate(R):
        lines.append(f"| {tasks[i]} | " + " | ".join(f"{a:.4f}" for a in row) + " |" + " |" * (len(tasks) - len(row)))
    return "\n".join(lines)


# --------------------------------------------------------------------------- runner


def as_sequence_stage(cfg: Config) -> Config:
    """A stage config as the sequence trains it: its one task named after the stage (``train.monitor`` naming the
    task's old name follows it), equal weighting."""
    old = next(iter(cfg.tasks))
    if cfg.train.monitor.startswith(f"{old}."):
        cfg.train.monitor = cfg.name + cfg.train.monitor[len(old) :]
    cfg.tasks = {cfg.name: cfg.tasks[old]}
    cfg.weighting.name = "equal"
    return cfg


def stage_model(method: str, top: Config, configs: List[Config], tasks: List[Task], upto: int) -> nn.Module:
    """The architecture ``method`` predicts task ``upto`` with (no weights loaded): columns 0..upto with their
    laterals (earlier ones frozen) for column methods, the shared encoder with the scenario's head otherwise.
    ``configs`` are stage configs (``as_sequence_stage``), ``tasks`` their tasks."""
    return stage_model_task(method, top, configs, tasks, upto)[0]


def stage_model_task(
    method: str, top: Config, configs: List[Config], tasks: List[Task], upto: int
) -> Tuple[nn.Module, Task]:
    """``stage_model`` and the task that scores it: in the class scenario, task ``upto``'s labels at their offset in
    the one head, with the names of every class seen so far (so predictions name the class they pick)."""
    learner = build_learner(method, top, torch.device("cpu"))
    model: Optional[nn.Module] = None
    for k in range(upto + 1):
        cfg = copy.deepcopy(configs[k])
        cfg.model.weights = None  # the architecture only: weights come from a checkpoint, or not at all
        st = SequenceTask(cfg, tasks[k], {}, torch.Generator(), {})
        model = learner.train_model(k, st)
    assert model is not None
    task = learner.task(upto, st)
    if top.continual.scenario == "class":
        task.classes = [name for t in tasks[: upto + 1] for name in t.classes]
    return model, task


def prepare_sequence(configs: List[Config], device: torch.device) -> List[SequenceTask]:
    """Each stage's data and its single task, renamed to the stage's name. Task k (0-based) is seeded with its
    stage's ``train.seed + k`` (written into its config.yaml): one seed for every task would start every new head or
    column from the same weights and shuffle each task's data alike, which GEM's FWT and the transfer scores would
    count as transfer."""
    sequence = []
    for k, cfg in enumerate(configs):
        cfg.train.seed = (cfg.train.seed + k) % 2**32
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
        if cfg.optim.layer_decay is not None:
            raise UserError(
                f"stage {cfg.name!r}: optim.layer_decay is not supported in continual runs (each method builds its "
                "own model); remove it"
            )
        if cfg.train.monitor == "delta_m" or cfg.train.baseline is not None:
            raise UserError(
                f"stage {cfg.name!r}: continual tasks have no delta_m (train.baseline and train.monitor=delta_m "
                "compare multitask runs); remove train.baseline and use train.monitor auto, loss or <task>.acc"
            )
        as_sequence_stage(cfg)
        tasks, _, loaders, generator, info = build_data(cfg, device)
        task = tasks[cfg.name]
        if "acc" not in task.metric_directions:
            raise UserError(f"stage {cfg.name!r}: continual metrics need an accuracy; a {task.type_name} task has none")
        sequence.append(SequenceTask(cfg, task, loaders, generator, info, build_monitor(cfg, {cfg.name: task})))
        pooled_head(cfg, cfg.name, task, in_dim=8)  # refuse a dense or stage-map head before anything trains
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


def check_methods(top: Config, sequence: List[SequenceTask]) -> None:
    """Every method of ``continual.methods`` known, with valid options, able to run the scenario, whose stages fit
    it: refused in one line before anything is written."""
    for method in top.continual.methods:
        build_learner(method, top, torch.device("cpu"))
    scenario = top.continual.scenario
    if scenario == "class":
        other = [f"{st.name} ({st.task.type_name})" for st in sequence if st.task.type_name != "classification"]
        if other:
            raise UserError(
                f"continual.scenario: class needs classification stages (one head over every class seen); "
                f"{', '.join(other)} is not; use continual.scenario: task"
            )
    if scenario == "domain":
        sizes = {st.name: int(st.task.out_dim) for st in sequence}
        if len(set(sizes.values())) > 1:
            raise UserError(
                "continual.scenario: domain needs the same classes in every stage (one head for all), but they have "
                + ", ".join(f"{n}: {c}" for n, c in sizes.items())
                + " outputs; use continual.scenario: task or class"
            )


def run_continual(
    top: Config, configs: List[Config], quiet: bool = False, root: Optional[Path] = None
) -> Dict[str, Any]:
    """Train the task sequence with every ``continual.methods`` entry into ``<run>/<method>/<task>/`` (``root``,
    else a new run directory), holding the run's lock throughout."""
    sequence = prepare_sequence(configs, select_device(top.train.device))
    check_methods(top, sequence)
    root = root or new_run_dir(top)
    root.mkdir(parents=True, exist_ok=True)
    lock = lock_run_dir(root)
    try:
        atomic_write(root / "config.yaml", lambda tmp: dump_config(top, tmp))
        return _run_sequence(top, sequence, root, quiet, resume=False)
    finally:
        lock.release()


def resume_continual(root: Path, top: Config, configs: List[Config], quiet: bool = False) -> Dict[str, Any]:
    """Continue the continual run in ``root``: a task run with ``summary.json`` is reused (its best weights and
    R row), one with ``checkpoints/last.pt`` resumes, later ones train; then the root's results are written.
    A run whose results and task runs are all there is left as it is (one line says so)."""
    names = [c.name for c in configs]
    parts = [root / m / n / "summary.json" for m in top.continual.methods for n in names]
    if (root / "summary.json").is_file() and all(p.is_file() for p in parts):
        print(f"{root} is complete: every method and task has its summary.json; nothing to resume")
        return json.loads((root / "summary.json").read_text())
    sequence = prepare_sequence(configs, select_device(top.train.device))
    check_methods(top, sequence)
    lock = lock_run_dir(root)
    try:
        return _run_sequence(top, sequence, root, quiet, resume=True)
    finally:
        lock.release()


def _run_sequence(top: Config, sequence: List[SequenceTask], root: Path, quiet: bool, resume: bool) -> Dict[str, Any]:
    methods = top.continual.methods
    device = select_device(top.train.device)
    names = [st.name for st in sequence]
    order = sorted(methods, key=lambda m: m != "independent")  # the transfer_pnn reference first
    results: Dict[str, Dict[str, Any]] = {}
    if not quiet:
        print(
            f"run {root}  |  continual: {', '.join(methods)} on {len(names)} tasks ({', '.join(names)})  |  "
            f"{top.model.encoder}  |  device {device}" + ("  |  resumed" if resume else "")
        )
    with SummaryWriter(str(root)) as tb:
        for method in order:
            results[method] = _run_method(method, top, sequence, device, root, tb, quiet, resume)
        splits = _splits(sequence)
        for split in splits:
            key = f"R{_suffix(split)}"
            single = (
                [results["independent"][key][k][k] for k in range(len(names))] if "independent" in results else None
            )
            for method in order:
                r = results[method]
                metrics = continual_metrics(
                    r[key], single, r[f"acc_before{_suffix(split)}"], r[f"acc_random_init{_suffix(split)}"]
                )
                if split == "val":
                    r.update(metrics)
                else:
                    r[split] = metrics
                for name in TB_METRICS:
                    if name in metrics:
                        tb.add_scalar(f"continual{_suffix(split)}/{name}/{method}", metrics[name], len(names))
        for method in order:
            _write_hparams(root / method, method, top, names, results[method])
        results = {m: results[m] for m in methods}
        pictures = _heatmaps(root, names, results, tb, splits[-1])
    text = _results_text(names, results, splits)
    atomic_write(root / "results.md", lambda tmp: Path(tmp).write_text(text + "\n"))
    summary = {"run_dir": str(root), "tasks": names, "methods": results}
    save_json(summary, root / "summary.json")
    if not quiet:
        print("\n" + text)
        print(f"\nwritten: {root / 'results.md'}, {root / 'summary.json'}; curves: tensorboard --logdir {root}")
        print(f"heatmaps: {root / 'plots'}" if pictures else f"no heatmaps: {MISSING}")
    return summary


TB_METRICS = ("acc", "bwt", "fwt_gem", "forgetting", "transfer_pnn")

SPLIT_TITLES = {
    "val": "On data.val_split (each task's best epoch is picked on it)",
    "test": "On data.test_split (each task's best epoch picked on data.val_split)",
}


def _results_text(names: List[str], results: Mapping[str, Mapping[str, Any]], splits: List[str]) -> str:
    """results.md: the table and every method's R per split, the test split first when there is one."""
    parts = []
    for split in reversed(splits):
        title = SPLIT_TITLES[split] if len(splits) > 1 else ""
        parts.append((f"{title}\n\n" if title else "") + results_table(names, results, split))
    for split in reversed(splits):
        on = f" on {split}" if len(splits) > 1 else ""
        parts += [
            f"R for {m}{on} (rows: after training on; columns: evaluated on)\n\n"
            f"{matrix_table(names, split_view(r, split)['R'])}"
            for m, r in results.items()
        ]
    return "\n\n".join(parts)


def _heatmaps(
    root: Path, names: List[str], results: Mapping[str, Mapping[str, Any]], tb: SummaryWriter, split: str
) -> List[Path]:
    """Each method's accuracy matrix R on ``split`` as a heatmap, ``<run>/plots/accuracy_<method>.png`` and
    TensorBoard's image ``continual/accuracy/<method>``, and one chart of ACC against the parameters each method
    adds per task (``plots/acc_vs_params.png``, image ``continual/acc_vs_params``); with matplotlib
    (``pip install 'mtl[plots]'``) only."""
    if not have_matplotlib():
        return []
    rows = [f"after {n}" for n in names]
    paths = []
    for method, r in results.items():
        view = split_view(r, split)
        matrix = [list(row) + [None] * (len(names) - len(row)) for row in view["R"]]
        title = f"{method}: {split} accuracy on each task (columns) after training each task (rows)"
        paths.append(heatmap_chart(matrix, rows, names, root / "plots" / f"accuracy_{method}.png", title))
        _add_image(tb, f"continual/accuracy/{method}", paths[-1], len(names))
    points = [(m, sum(r["params_per_task"]) / len(names), split_view(r, split)["acc"]) for m, r in results.items()]
    title = f"final {split} ACC against the parameters added per task"
    paths.append(
        pareto_chart(
            points,
            "parameters added per task",
            f"ACC ({split})",
            root / "plots" / "acc_vs_params.png",
            maximize=(False, True),
            title=title,
        )
    )
    _add_image(tb, "continual/acc_vs_params", paths[-1], len(names))
    return paths


def _add_image(tb: SummaryWriter, tag: str, path: Path, step: int) -> None:
    with Image.open(path) as image:
        tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")


def _write_hparams(method_dir: Path, method: str, top: Config, names: List[str], r: Mapping[str, Any]) -> None:
    """One TensorBoard hparams session per method in ``<run>/<method>/`` (written into that directory itself, as
    ``TensorBoardHook`` does for a run), with its continual metrics as ``continual/<metric>``."""
    metrics = {f"continual/{key}": float(r[key]) for key in TB_METRICS if key in r}
    hp = {"method": method, "tasks": ",".join(names), "encoder": top.model.encoder}
    with SummaryWriter(str(method_dir)) as writer:
        for event in hparams(hp, metrics):
            writer.file_writer.add_summary(event)
        for key, value in metrics.items():
            writer.add_scalar(key, value, len(names))


@contextmanager
def _rng_untouched(generators: List[torch.Generator]) -> Iterator[None]:
    """Evaluations made for the metrics leave every random state (and the loaders' generators) as they were, so
    the training draws what it drew without them."""
    state, saved = rng_state(), [g.get_state() for g in generators]
    try:
        yield
    finally:
        set_rng_state(state)
        for g, s in zip(generators, saved):
            g.set_state(s)


def _memory_format(model: nn.Module, cfg: Config) -> bool:
    """``train.channels_last`` as a single run applies it: NHWC weights for a model with convolutions."""
    on = cfg.train.channels_last != "off" and any(isinstance(m, nn.Conv2d) for m in model.modules())
    if on:
        model.to(memory_format=torch.channels_last)
    return on


def _random_init_accuracy(
    method: str, top: Config, sequence: List[SequenceTask], device: torch.device
) -> Dict[str, List[float]]:
    """``b_i`` of GEM's FWT, per split: the accuracy on task i of ``method``'s model for task i before anything is
    trained, built with the seeds the run builds it with (so task i's new column or head is the one training
    starts from)."""
    splits = _splits(sequence)
    accuracies: Dict[str, List[float]] = {split: [] for split in splits}
    with _rng_untouched([st.generator for st in sequence]):
        seed_everything(top.train.seed, top.train.deterministic)
        learner = build_learner(method, top, device)
        for k, st in enumerate(sequence):
            seed_everything(st.cfg.train.seed, st.cfg.train.deterministic)
            model = learner.train_model(k, st)
            for split, acc in _scores(
                model, st, splits, device, _memory_format(model, st.cfg), learner.task(k, st)
            ).items():
                accuracies[split].append(acc)
    return accuracies


def _run_method(
    method: str,
    top: Config,
    sequence: List[SequenceTask],
    device: torch.device,
    root: Path,
    tb: Any,
    quiet: bool,
    resume: bool,
) -> Dict[str, Any]:
    """Train ``method`` through the sequence. Every accuracy is measured on each split the stages score (``val``,
    and ``test`` with data.test_split): ``R``/``R_test``, ``acc_before``/``acc_before_test``, and so on."""
    splits = _splits(sequence)
    random_init = _random_init_accuracy(method, top, sequence, device)
    seed_everything(top.train.seed, top.train.deterministic)
    learner = build_learner(method, top, device)
    R: Dict[str, List[List[float]]] = {split: [] for split in splits}
    before: Dict[str, List[float]] = {split: [] for split in splits}
    params, times, memory = [], [], []
    for k, st in enumerate(sequence):
        cfg, run_dir = st.cfg, root / method / st.name
        seed_everything(cfg.train.seed, cfg.train.deterministic)
        model = learner.train_model(k, st)
        channels_last = _memory_format(model, cfg)
        with _rng_untouched([s.generator for s in sequence]):  # R[k-1][k]: task k's model before training on it
            for split, acc in _scores(model, st, splits, device, channels_last, learner.task(k, st)).items():
                before[split].append(acc)
        done = resume and (run_dir / "summary.json").is_file()
        if not quiet:
            print(f"\n=== {method}: task {k + 1}/{len(sequence)} {st.name}{' (done: reused)' if done else ''} ===")
        if done:
            rows, seconds, used = _reuse_task(model, run_dir, k, splits)
            state = run_dir / "learner.pt"
            if state.is_file():
                learner.load_state_dict(load_checkpoint(state))
            else:  # a learner that keeps nothing across tasks (or a run written before learners kept state)
                learner.end_task(k, st, model)
        else:
            mark = memory_mark(device)
            seconds = _train_task(method, k, sequence, learner, model, run_dir, device, channels_last, quiet, resume)
            used = training_memory(device, mark)
            learner.end_task(k, st, model)
            kept = learner.state_dict()
            if kept:  # written before summary.json: a task with a summary always has the state later tasks need
                save_checkpoint(kept, run_dir / "learner.pt")
            scores = [
                _scores(
                    learner.eval_model(j, sequence[j]),
                    sequence[j],
                    splits,
                    device,
                    channels_last,
                    learner.task(j, sequence[j]),
                )
                for j in range(k + 1)
            ]
            rows = {split: [s[split] for s in scores] for split in splits}
            for split in splits:
                suffix = "" if split == "val" else f"_{split}"
                for j, acc in enumerate(rows[split]):
                    tb.add_scalar(f"R{suffix}/{method}/{sequence[j].name}", acc, k + 1)
                tb.add_scalar(f"average_acc{suffix}/{method}", sum(rows[split]) / len(rows[split]), k + 1)
            save_json(
                {
                    "method": method,
                    "task": st.name,
                    **{f"R{_suffix(split)}_row": rows[split] for split in splits},
                    **{f"acc_before{_suffix(split)}": before[split][-1] for split in splits},
                    **{f"acc_random_init{_suffix(split)}": random_init[split][k] for split in splits},
                    "params": parameter_counts(model),
                    "time_s": seconds,
                    "memory": used,
                },
                run_dir / "summary.json",
            )
        for split in splits:
            R[split].append(rows[split])
        times.append(seconds)
        memory.append(used)
        params.append(learner.added_parameters(k, st))
    out: Dict[str, Any] = {"splits": splits}
    for split in splits:
        out[f"R{_suffix(split)}"] = R[split]
        out[f"acc_before{_suffix(split)}"] = before[split]
        out[f"acc_random_init{_suffix(split)}"] = random_init[split]
    return {**out, "params_per_task": params, "time_s": times, "memory": memory}


def _splits(sequence: List[SequenceTask]) -> List[str]:
    """``val``, and ``test`` when every stage has a data.test_split."""
    return ["val"] + (["test"] if all("test" in st.loaders for st in sequence) else [])


def _suffix(split: str) -> str:
    return "" if split == "val" else f"_{split}"


def _scores(
    model: nn.Module, st: SequenceTask, splits: List[str], device: torch.device, channels_last: bool, task: Task
) -> Dict[str, float]:
    return {split: _accuracy(model, st, device, channels_last, task, split) for split in splits}


def _reuse_task(
    model: nn.Module, run_dir: Path, k: int, splits: List[str]
) -> Tuple[Dict[str, List[float]], float, Any]:
    """A finished task run: its weights (``best.pt``, which training ended with, else ``last.pt``) go into
    ``model``, and its R rows (one per split), time and memory come from its ``summary.json``."""
    saved = json.loads((run_dir / "summary.json").read_text())
    rows = {split: saved.get(f"R{_suffix(split)}_row") for split in splits}
    for split, row in rows.items():
        if not isinstance(row, list) or len(row) != k + 1:
            raise UserError(
                f"cannot resume: {run_dir / 'summary.json'} holds no {split} R row of {k + 1} accuracies; delete "
                f"that summary.json to train the task again from its checkpoint, or start a new run"
            )
    best = run_dir / "checkpoints" / "best.pt"
    model.load_state_dict(load_checkpoint(best if best.is_file() else run_dir / "checkpoints" / "last.pt")["model"])
    return {s: [float(a) for a in row] for s, row in rows.items()}, float(saved.get("time_s", 0.0)), saved.get("memory")


def _train_task(
    method: str,
    k: int,
    sequence: List[SequenceTask],
    learner: Learner,
    model: nn.Module,
    run_dir: Path,
    device: torch.device,
    channels_last: bool,
    quiet: bool,
    resume: bool,
) -> float:
    """Train task k into ``run_dir``; with ``resume``, from its ``checkpoints/last.pt`` when it has one (a folder
    without one, killed in its first epoch, is trained again from the start). Returns the seconds it took."""
    st = sequence[k]
    cfg, last = st.cfg, run_dir / "checkpoints" / "last.pt"
    partial = resume and last.is_file()
    if resume and run_dir.exists() and not partial:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=partial)
    if not partial:
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
        cfg, run_dir, classes=classes, meta=meta, hparams={"method": method}, n_images=0, quiet=quiet
    )  # no unfreezing, no graph
    trainer = build_trainer(
        cfg,
        model,
        {st.name: learner.task(k, st)},
        st.loaders,
        device=device,
        generator=st.generator,
        hooks=hooks,
        quiet=quiet,
        grad_on=cfg.weighting.grad_on,
        extension=learner.extension(k, st),
        monitor=st.monitor,
        channels_last=channels_last,
        nonfinite=cfg.train.nonfinite,
    )
    if partial:
        state = load_checkpoint(last)
        check_resumable(run_dir, cfg, state)
        trainer.load_state_dict(state)
    started = time.perf_counter()
    trainer.fit()
    return time.perf_counter() - started
