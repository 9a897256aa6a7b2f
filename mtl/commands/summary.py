"""``mtl summary``: the layer table of the model a config (or a run) builds."""

import argparse

from mtl.commands import add_import_option
from mtl.workflows.inspect import summary_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Layers of the model a config (or a run) builds, as torchsummary prints them."
    parser.add_argument("target", help="a config file or a run directory")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.freeze=all")
    parser.add_argument("--input", metavar="C,H,W", help="input shape (default 3,<data.image_size>,<data.image_size>)")
    parser.add_argument("--depth", type=int, default=None, help="only modules up to this nesting depth")
    parser.add_argument(
        "--stage", metavar="NAME", help="a config (or run) with stages: the stage to show (default: the last)"
    )
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    print(summary_command(args.target, args.overrides, args.input, args.depth, args.stage))
    return 0
