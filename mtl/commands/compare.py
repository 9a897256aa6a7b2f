"""``mtl compare``: runs grouped over seeds (mean ± std, 95 % interval) with delta_m; or a baseline file from runs."""

import argparse

from mtl.core.errors import UserError
from mtl.workflows.compare import SELECT_CHOICES, aggregate, render, write_baseline
from mtl.workflows.continual_compare import continual_groups, continual_plots, continual_table, find_continual_runs
from mtl.workflows.report import write_plots


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "One row per group of runs that differ only in train.seed (or per sweep point; staged runs per stage), one "
        "column per task metric as mean ± std [95 % t-interval] over seeds; with --baseline also delta_m % in two "
        "conventions (flat and LibMTL's) against single-task results."
    )
    parser.add_argument("runs", nargs="+", help="run directories, staged runs, sweep folders, or folders of runs")
    parser.add_argument("--baseline", metavar="FILE", help="single-task results {task: {metric: value}} (YAML)")
    parser.add_argument(
        "--select",
        metavar="MODE",
        help=f"which epoch each run reports: {SELECT_CHOICES}; default best (chosen by train.monitor on validation)",
    )
    parser.add_argument(
        "--which", choices=("final", "best"), help="old name of --select (final = last); kept for old scripts"
    )
    parser.add_argument("--format", choices=("md", "csv", "json"), default="md", help="output format (default md)")
    parser.add_argument("--metrics", metavar="M1,M2", help="only these metric names, comma-separated")
    parser.add_argument(
        "--time",
        action="store_true",
        help="also the training time per step (mean over seeds) and its ratio to the first group's, and the time "
        "spent caching encoder features once (runs that did)",
    )
    parser.add_argument(
        "--plots",
        metavar="DIR",
        help="also write PNGs there: bars with error bars, Pareto front (two tasks), validation curves (mtl[plots])",
    )
    parser.add_argument(
        "--write-baseline", metavar="FILE", help="write the runs' per-task metrics (mean over seeds) as a baseline file"
    )


def run(args: argparse.Namespace) -> int:
    which = {"final": "last"}.get(args.which, args.which)
    if which and args.select and args.select != which:
        raise UserError(f"--which {args.which} and --select {args.select} disagree; give only --select")
    select = args.select or which or "best"
    roots, skipped, others = find_continual_runs(args.runs)
    if roots:
        return _continual(args, roots, skipped, others)
    if args.write_baseline:
        write_baseline(args.runs, args.write_baseline, select)
        print(f"wrote {args.write_baseline}")
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        agg = aggregate(args.runs, select, args.baseline, timing=args.time)
        print(render(agg, args.format, metrics))
        if args.plots:
            for path in write_plots(agg, args.plots, metrics):
                print(f"wrote {path}")
    return 0


def _continual(args: argparse.Namespace, roots: list, skipped: list, others: list) -> int:
    """Continual runs: each method's metrics as mean ± std over seeds; --plots: mean R heatmaps, ACC vs params."""
    if others:
        raise UserError(f"{roots[0]} is a continual run and {others[0]} is not: compare continual runs on their own")
    given = [f"--{k.replace('_', '-')}" for k in ("baseline", "select", "which", "metrics", "time", "write_baseline")]
    used = [flag for flag in given if getattr(args, flag[2:].replace("-", "_"))]
    if used or args.format != "md":
        raise UserError(
            f"{', '.join(used + ([f'--format {args.format}'] if args.format != 'md' else []))} "
            "does not apply to continual runs; their table takes --plots only"
        )
    groups = continual_groups(roots)
    print(continual_table(groups))
    for line in skipped:
        print(f"left out: {line}")
    if args.plots:
        for path in continual_plots(groups, args.plots):
            print(f"wrote {path}")
    return 0
