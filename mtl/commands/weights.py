"""``mtl weights import|list``: torchvision weight files for offline use."""

import argparse

from mtl.models.weights import format_cached_table, import_weights, list_cached


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("import", help="put a torchvision weights file into torchvision's cache (hash checked)")
    imp.add_argument("file")
    actions.add_parser("list", help="list the weight files in torchvision's cache")


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        print(f"imported to {import_weights(args.file)}")
    else:
        print(format_cached_table(list_cached()))
    return 0
