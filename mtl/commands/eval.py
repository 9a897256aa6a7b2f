"""``mtl eval``: metrics and confusion matrices of a run's best checkpoint on one split."""

import argparse

from mtl.commands import add_import_option
from mtl.workflows.evaluate import eval_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("--split", default="val", help="which split of the run's data set (default val)")
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    print(eval_command(args.run, args.split))
    return 0
