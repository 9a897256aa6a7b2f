"""Single-task baselines vs multitask weighting methods on one config, over seeds, in one process.

    python benchmarks/weighting.py configs/mtl_scenes.yaml --methods equal,uncertainty,pcgrad,mgda train.epochs=10
    python benchmarks/weighting.py configs/multi_fashion.yaml --seeds 0,1,2 --import my_project.weighting \\
        --methods equal,my_method

Trains one single-task run per task and seed (the baselines), then the multitask config once per method and seed
(``train.seed`` set to each seed), and prints a Markdown table: per run kind, the final validation metrics per task,
delta_m % against the single-task baselines in both conventions (flat: the mean over (task, metric) pairs, as
Nash-MTL and FAMO; LibMTL's Δp: the mean over tasks of each task's mean; README, "Δm and comparisons"), and the
mean training time per step with its ratio to equal weighting (same process, same machine). With several seeds
every cell is the mean ± the sample standard deviation (ddof = 1) over the seeds. The baseline of delta_m is each
single-task metric's mean over the seeds; each seed's multitask run gets its delta_m against it, and the table
shows their mean ± std. ``× equal`` is the mean step time over the mean of equal's.
The config's ``weighting.options`` go to its own method only; the other methods run with their defaults.

Your own weighting methods come from ``--import MODULE`` (repeatable) or the config's ``imports:``. The config,
the method names and options, ``--seeds``, ``--metrics`` and the data are checked before the first run trains: bad
input is one line, exit 2.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from mtl.build.data import build_dataset
from mtl.build.tasks import build_tasks, config_targets, dataset_targets
from mtl.cli import _Parser
from mtl.commands import add_import_option
from mtl.config.load import build_config, load_config
from mtl.core.errors import UserError
from mtl.core.imports import import_config_modules, import_modules
from mtl.engine.monitor import delta_m, delta_p
from mtl.weighting import WEIGHTINGS, build_weighting
from mtl.workflows.compare import run_directions, run_metrics
from mtl.workflows.plots import mean_std
from mtl.workflows.train import run

Summary = Dict[str, Any]
SINGLE = "single-task "  # the label of a baseline row, before its task


def _step_s(summary: Summary) -> float:
    return summary["time"]["mean_train_epoch_s"] / max(summary["steps_per_epoch"], 1)


def _device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def _names(text: str, what: str) -> List[str]:
    names = [n.strip() for n in text.split(",")]
    if not all(names):
        raise UserError(f"{what} must be comma-separated names without empty ones, got {text!r}")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"{what} names {', '.join(twice)} twice; give each once")
    return names


def parse_seeds(text: str) -> List[int]:
    """``0,1,2`` -> [0, 1, 2]: distinct whole numbers in train.seed's range."""
    seeds = []
    for item in _names(text, "--seeds"):
        if not item.isdigit() or int(item) > 2**32 - 1:
            raise UserError(
                f"--seeds must be comma-separated whole numbers from 0 to 2**32-1, e.g. 0,1,2; got {text!r}"
            )
        seeds.append(int(item))
    return seeds


def _with(raw: Dict[str, Any], name: str, seed: int, tasks: Optional[Sequence[str]], method: str) -> Dict[str, Any]:
    """A copy of the config ``raw`` as one run: its tasks, weighting method, seed and name."""
    out = copy.deepcopy(raw)
    if tasks is not None:
        out["tasks"] = {t: raw["tasks"][t] for t in tasks}
    weighting = dict(out.get("weighting") or {})
    if weighting.get("name", "equal") != method:  # options belong to the config's own method
        weighting.pop("options", None)
    out["weighting"] = {**weighting, "name": method}
    out["train"] = {**(out.get("train") or {}), "seed": seed}
    out["name"] = name
    return out


def _plan(args: argparse.Namespace) -> Tuple[List[str], List[Tuple[str, int, Any]], List[int]]:
    """Every run, built and checked before any trains: (tasks, [(row label, seed, config)], seeds)."""
    import_modules(args.imports)
    raw, sources = load_config(args.config, args.overrides + [f"out_dir={args.out}", "train.progress=false"])
    import_config_modules(raw)
    top = build_config(raw, sources)
    if top.stages or top.continual.methods:
        raise UserError(f"{args.config} runs stages; benchmarks/weighting.py takes a config of one multitask run")
    tasks = list(top.tasks)  # tasks set to null are gone
    if len(tasks) < 2:
        raise UserError(f"{args.config} has one task ({', '.join(tasks)}); the benchmark needs a multitask config")
    methods = _names(args.methods, "--methods")
    for method in methods:
        if method not in WEIGHTINGS:
            raise UserError(
                f"--methods: unknown weighting {method!r} (known: {', '.join(WEIGHTINGS.names())}); register "
                f"your own with --import MODULE or the config's imports"
            )
        options = top.weighting.options if method == top.weighting.name else {}
        build_weighting(method, tasks, [t.weight for t in top.tasks.values()], **options)  # refuses bad options
    seeds = parse_seeds(args.seeds) if args.seeds else [top.train.seed]
    declared = config_targets(top)
    if declared is None:  # the data says the class counts; building it here also checks that it is there
        declared = dataset_targets(build_dataset(top.data, top.data.train_split, train=False))
    reported = {m for task in build_tasks(top, declared).values() for m in task.metric_directions}
    unknown = [m for m in _names(args.metrics, "--metrics") if m not in reported] if args.metrics else []
    if unknown:
        raise UserError(
            f"--metrics: the tasks report no {', '.join(unknown)}; they report {', '.join(sorted(reported))}"
        )
    base = raw.get("name", "run")
    runs = [
        (f"{SINGLE}{t}", s, _with(raw, f"{base}_single_{t}_seed{s}", s, [t], "equal"))
        for t in ([] if args.skip_single else tasks)
        for s in seeds
    ]
    runs += [(m, s, _with(raw, f"{base}_{m}_seed{s}", s, None, m)) for m in methods for s in seeds]
    return tasks, [(label, s, build_config(r, sources)) for label, s, r in runs], seeds


def _cell(values: Sequence[float], fmt: str = "{:.4f}", scale: float = 1.0) -> str:
    if not values:
        return ""
    mean, std = mean_std([v * scale for v in values])
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.replace("+", "").format(std))


def table(tasks: Sequence[str], rows: Dict[str, List[Summary]], shown: Optional[Sequence[str]] = None) -> List[str]:
    """The Markdown lines: one row per run kind (its seeds' summaries), mean ± std over the seeds."""
    singles = {label[len(SINGLE) :]: s for label, s in rows.items() if label.startswith(SINGLE)}
    baseline: Dict[str, Dict[str, float]] = {}
    for task, summaries in singles.items():
        names = run_metrics(summaries[0])[task]
        means = {m: mean_std([run_metrics(s)[task][m] for s in summaries])[0] for m in names if m != "loss"}
        baseline[task] = {m: v for m, v in means.items() if v != 0}  # a zero cannot be improved on relatively
    last = run_metrics(list(rows.values())[-1][0])
    columns = [(t, m) for t in tasks for m in last.get(t, {}) if m != "loss" and (not shown or m in shown)]
    equal = [_step_s(s) for s in rows.get("equal", [])]
    header = ["run"] + [f"{t}.{m}" for t, m in columns] + ["Δm % (flat)", "Δm % (LibMTL Δp)", "s/step", "× equal"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for label, summaries in rows.items():
        metrics = [run_metrics(s) for s in summaries]
        cells = [label] + [_cell([v[t][m] for v in metrics if m in v.get(t, {})]) for t, m in columns]
        multi = not label.startswith(SINGLE)
        if baseline and multi:
            for convention in (delta_m, delta_p):
                deltas = [convention(v, baseline, run_directions(s)) for v, s in zip(metrics, summaries)]
                cells.append(_cell(deltas, "{:+.2f}"))
        else:
            cells += ["", ""]
        steps = [_step_s(s) for s in summaries]
        cells.append(_cell(steps, "{:.1f}", 1000) + " ms")
        ratio = mean_std(steps)[0] / mean_std(equal)[0] if equal and multi else None
        cells.append(f"{ratio:.2f}" if ratio is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    """Train the plan and print the table; bad input is one ``mtl: error:`` line and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog="benchmarks/weighting.py", description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("overrides", nargs="*", help="config overrides applied to every run, e.g. train.epochs=5")
    parser.add_argument(
        "--methods",
        default="equal,uncertainty,dwa,pcgrad,mgda,cagrad",
        help="comma-separated weighting names (default: %(default)s)",
    )
    parser.add_argument("--seeds", help="comma-separated train.seed values, e.g. 0,1,2 (default: the config's)")
    parser.add_argument("--out", default="runs/bench_weighting", help="run directory root (default: %(default)s)")
    parser.add_argument("--skip-single", action="store_true", help="no single-task baselines (no delta_m)")
    parser.add_argument("--metrics", help="comma-separated metric names to show (delta_m always uses all)")
    add_import_option(parser)
    args, extra = parser.parse_known_args(argv)
    args.overrides += [a for a in extra if "=" in a and not a.startswith("-")]  # overrides after an option
    unknown = [a for a in extra if a.startswith("-") or "=" not in a]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        tasks, plan, seeds = _plan(args)
        rows: Dict[str, List[Summary]] = {}
        for label, seed, cfg in plan:
            t0 = time.perf_counter()
            rows.setdefault(label, []).append(run(cfg, quiet=True))
            print(f"{label} seed {seed}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    except UserError as e:
        print(f"mtl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    spread = f"mean ± sample std over seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else f"seed {seeds[0]}"
    print(f"`python benchmarks/weighting.py {' '.join(argv)}`, {time.strftime('%Y-%m-%d')}, {_device()}, {spread}\n")
    print("\n".join(table(tasks, rows, _names(args.metrics, "--metrics") if args.metrics else None)))
    print(f"\nruns under {Path(args.out).resolve()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
