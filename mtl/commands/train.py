"""``mtl train``: one run, every stage of a staged config, or a continual sequence (at ``--run-dir DIR`` if given);
or resume a run."""

import argparse
from pathlib import Path

from mtl.commands import add_import_option
from mtl.core import distributed
from mtl.core.errors import UserError
from mtl.workflows.stages import resume_from_dir, train_from_file
from mtl.workflows.sweep import check_empty_dir, sweep_note


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Train from a YAML config; key=value arguments override config keys."
    parser.add_argument(
        "config", nargs="?", help="a config file, e.g. configs/quickstart.yaml or runs/x/<time>/config.yaml"
    )
    parser.add_argument("overrides", nargs="*", help="overrides such as optim.lr=0.01 train.epochs=3 model.freeze=all")
    parser.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="continue the run in RUN_DIR from its last checkpoint; a staged or continual run continues as a whole",
    )
    parser.add_argument(
        "--run-dir", metavar="DIR", help="write the run (or a staged or continual run's root) at DIR, new or empty"
    )
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    distributed.init_from_env()  # under torchrun: join the process group
    try:
        if args.resume:
            if args.config or args.overrides or args.run_dir:
                raise UserError("--resume takes only a run directory; the run's own config.yaml is used")
            resume_from_dir(args.resume)
        elif not args.config:
            raise UserError("mtl train needs a config file, e.g. mtl train configs/quickstart.yaml")
        else:
            run_dir = None
            if args.run_dir:
                hint = f"; to continue a run there use mtl train --resume {args.run_dir}"
                distributed.on_main(lambda: check_empty_dir(args.run_dir, "--run-dir", hint))
                run_dir = Path(args.run_dir)
            note = sweep_note(args.config, args.overrides)
            if note and distributed.is_main():
                print(note)
            train_from_file(args.config, args.overrides, run_dir)
    finally:
        distributed.shutdown()
    return 0
