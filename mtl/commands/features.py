"""``mtl features``: PNG grids of the feature maps of selected layers for one image."""

import argparse

from mtl.commands import add_import_option
from mtl.workflows.inspect import features_command


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = "Forward hooks on the selected layers; one PNG grid per layer."
    parser.add_argument("target", help="a config file or a run directory (its best checkpoint)")
    parser.add_argument("overrides", nargs="*", help="config overrides")
    parser.add_argument("--image", required=True, help="an image file")
    parser.add_argument(
        "--layers",
        default="conv",
        help="conv (every convolution), or comma-separated module names "
        "or glob patterns, e.g. encoder.layer1,encoder.layer4.*",
    )
    parser.add_argument("--out", help="output folder (default <run>/features or runs/features/<name>)")
    parser.add_argument("--max-maps", type=int, default=64, help="channels shown per layer (default 64)")
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    paths = features_command(args.target, args.overrides, args.image, args.layers, args.out, args.max_maps)
    print(f"wrote {len(paths)} feature-map grids to {paths[0].parent if paths else args.out}")
    return 0
