"""Layer 6: one module per ``mtl <command>``, each with ``add_arguments(parser)`` and ``run(args) -> int``.

``mtl.cli`` lists them in ``COMMANDS`` and imports only the one that runs. A command prints its result; the layers
below return it, and only training prints as it goes (bars, a run's banner and epoch lines, stage tables).
"""

import argparse


def add_import_option(parser: argparse.ArgumentParser) -> None:
    """``--import MODULE`` (repeatable): the user's modules that register parts, imported before the command runs."""
    parser.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import a module that registers your own encoders, heads, losses, metrics or "
        "weighting methods (repeatable; also the config key imports)",
    )
