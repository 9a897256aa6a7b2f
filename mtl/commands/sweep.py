"""``mtl sweep``: a grid of overrides times seeds, one ordinary run each, under one sweep directory; or resume one."""

import argparse
import sys

from mtl.commands import add_import_option
from mtl.config.schema import LAUNCHERS
from mtl.core.errors import UserError
from mtl.workflows.compare import aggregate
from mtl.workflows.continual_compare import find_continual_runs, write_continual_report
from mtl.workflows.launchers import describe_code
from mtl.workflows.plots import MISSING, have_matplotlib
from mtl.workflows.report import write_report
from mtl.workflows.sweep import resume_sweep, run_sweep, slurm_extra


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train every point of a grid of overrides once per seed. A key=v1,v2 argument is an axis of the grid "
        "(commas inside [ ] or { } do not split: [1,2] is one list); key=value sets a key for every run."
    )
    parser.add_argument("config", nargs="?", help="a config file; its sweep: section gives seeds, grid and launcher")
    parser.add_argument("overrides", nargs="*", help="e.g. optim.lr=0.001,0.003 weighting.name=equal,pcgrad")
    parser.add_argument("--seeds", metavar="0,1,2", help="train each point with each of these seeds")
    parser.add_argument(
        "--dir", metavar="DIR", help="the sweep directory (new or empty; default <out_dir>/<name>/sweep-<time>)"
    )
    parser.add_argument("--resume", metavar="SWEEP_DIR", help="continue a sweep: skip finished runs, resume the others")
    parser.add_argument("--jobs", type=int, metavar="N", help="local launcher: runs at a time (default 1)")
    parser.add_argument("--launcher", choices=LAUNCHERS, help="local (default), slurm or submitit_local (submitit)")
    slurm = parser.add_argument_group("slurm and submitit_local jobs (also sweep.slurm in the config)")
    slurm.add_argument("--partition")
    slurm.add_argument("--gpus-per-node", type=int, metavar="G", help="GPUs per run (default 1; > 1: torchrun)")
    slurm.add_argument("--cpus-per-task", type=int, metavar="N")
    slurm.add_argument("--mem-gb", type=float, metavar="GB")
    slurm.add_argument("--time", type=int, metavar="MINUTES", help="time limit per run (default 60)")
    slurm.add_argument("--array-parallelism", type=int, metavar="N", help="runs of the array at a time")
    slurm.add_argument(
        "--slurm-extra", action="append", default=[], metavar="KEY=VALUE", help="another sbatch parameter (repeatable)"
    )
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    slurm = {
        "partition": args.partition,
        "gpus_per_node": args.gpus_per_node,
        "cpus_per_task": args.cpus_per_task,
        "mem_gb": args.mem_gb,
        "time": args.time,
        "array_parallelism": args.array_parallelism,
        "extra": slurm_extra(args.slurm_extra),
    }
    options = {"jobs": args.jobs, "launcher": args.launcher, "slurm": slurm}
    if args.resume:
        if args.config or args.overrides or args.seeds or args.dir:
            raise UserError(
                "--resume takes only a sweep directory (and launcher options); its grid and seeds are in its sweep.json"
            )
        result = resume_sweep(args.resume, options)
    elif not args.config:
        raise UserError("mtl sweep needs a config file, e.g. mtl sweep cfg.yaml --seeds 0,1,2 optim.lr=0.001,0.003")
    else:
        result = run_sweep(args.config, args.overrides, args.seeds, options, args.dir, args.imports)
    for label, log, code, why in result["failed"]:
        print(f"mtl: failed: {label} ({why or describe_code(code)}); log: {log}", file=sys.stderr)
    done = sum(r["status"] == "done" for r in result["runs"])
    print(f"sweep {result['dir']}: {done} of {len(result['runs'])} runs done, {len(result['failed'])} failed")
    continual = find_continual_runs([result["dir"]])[0] if done else []
    if continual:  # a sweep of a continual config: each run is a task sequence with its methods
        report = write_continual_report(continual, result["dir"])
        pictures = "" if have_matplotlib() else f" (no pictures: {MISSING})"
        print(f"results: {report}{pictures}")
    elif done:
        report = write_report(aggregate([result["dir"]]), result["dir"])
        pictures = "" if have_matplotlib() else f" (no pictures: {MISSING})"
        print(f"results: {report}{pictures}")
    print(f"compare them: mtl compare {result['dir']}")
    return 1 if result["failed"] else 0
