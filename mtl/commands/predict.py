"""``mtl predict``: a trained run's predictions for image files and folders."""

import argparse

from mtl.commands import add_import_option
from mtl.workflows.predict import predict_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", help="a run directory")
    parser.add_argument("inputs", nargs="+", help="image files or folders")
    parser.add_argument("--topk", type=int, default=3)
    parser.add_argument("--out", help="output folder (default <run>/predictions)")
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    print(predict_command(args.run, args.inputs, args.topk, args.out))
    return 0
