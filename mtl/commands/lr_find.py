"""``mtl lr-find``: the learning-rate range test of a config, with a suggested ``optim.lr``."""

import argparse

from mtl.commands import add_import_option
from mtl.config.load import build_config, load_config
from mtl.config.stages import stage_configs
from mtl.core.imports import import_config_modules
from mtl.workflows.lr_find import check_range, lr_find, pick_stage
from mtl.workflows.plots import MISSING


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train from a config with the learning rate growing exponentially from --start-lr to --end-lr over --steps "
        "steps (stopping once the smoothed loss diverges), and suggest optim.lr where the smoothed loss falls "
        "fastest. Writes <out_dir>/<name>/<time>-lr_find/ (lr_find.json, lr_find.png, TensorBoard); the weights "
        "are thrown away."
    )
    parser.add_argument("config", help="a config file, e.g. configs/quickstart.yaml")
    parser.add_argument("overrides", nargs="*", help="overrides such as model.freeze=all optim.layer_decay=0.75")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="the first learning rate (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    parser.add_argument("--steps", type=int, default=100, help="training steps from start to end (default 100)")
    parser.add_argument("--stage", metavar="NAME", help="a config with stages: test this stage's settings")
    add_import_option(parser)


def run(args: argparse.Namespace) -> int:
    check_range(args.start_lr, args.end_lr, args.steps)
    raw, sources = load_config(args.config, args.overrides)
    import_config_modules(raw)
    cfg = build_config(raw, sources)
    if args.stage is not None or (cfg.stages and not cfg.continual.methods):
        cfg = pick_stage(cfg, stage_configs(raw, sources), args.stage)
    result = lr_find(cfg, args.start_lr, args.end_lr, args.steps)
    n, picture = len(result["lrs"]), "" if result["plot"] else f" (no picture: {MISSING})"
    how = f"{n} steps" + (", stopped early: the smoothed loss diverged" if result["stopped_early"] else "")
    if result["suggestion"] is None:
        print(
            f"no suggestion: too few steps before the loss diverged ({how}); raise --steps or lower --end-lr  |  "
            f"written to {result['dir']}{picture}"
        )
    else:
        lr = f"{result['suggestion']:.3g}"
        print(
            f"suggested lr {lr} (steepest descent of the smoothed loss, {how}): optim.lr={lr}  |  "
            f"written to {result['dir']}{picture}"
        )
    return 0
