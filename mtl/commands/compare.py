"""``mtl compare``: a table of runs' metrics and their delta_m; or a baseline file from runs."""

import argparse

from mtl.workflows.compare import compare_table, write_baseline


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "One row per run (or per stage), one column per task metric; with --baseline also "
        "delta_m %% against single-task results."
    )
    parser.add_argument("runs", nargs="+", help="run directories, staged runs, or folders of runs")
    parser.add_argument("--baseline", metavar="FILE", help="single-task results {task: {metric: value}} (YAML)")
    parser.add_argument(
        "--which", choices=("final", "best"), default="final", help="which epoch's metrics (default final)"
    )
    parser.add_argument("--metrics", metavar="M1,M2", help="only these metric names, comma-separated")
    parser.add_argument("--write-baseline", metavar="FILE", help="write the runs' per-task metrics as a baseline file")


def run(args: argparse.Namespace) -> int:
    if args.write_baseline:
        write_baseline(args.runs, args.write_baseline, args.which)
        print(f"wrote {args.write_baseline}")
    else:
        metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
        print(compare_table(args.runs, args.baseline, args.which, metrics))
    return 0
