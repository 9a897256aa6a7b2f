"""``mtl train``: one run, every stage of a staged config, or a continual sequence; or resume a run."""

import argparse

from mtl.commands import add_import_option
from mtl.core import distributed
from mtl.core.errors import UserError
from mtl.workflows.stages import resume_from_dir, train_from_file


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
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    distributed.init_from_env()  # under torchrun: join the process group
    try:
        if args.resume:
            if args.config or args.overrides:
                raise UserError("--resume takes only a run directory; the run's own config.yaml is used")
            resume_from_dir(args.resume)
        elif not args.config:
            raise UserError("mtl train needs a config file, e.g. mtl train configs/quickstart.yaml")
        else:
            train_from_file(args.config, args.overrides)
    finally:
        distributed.shutdown()
    return 0
