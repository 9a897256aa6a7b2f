"""The ``mtl`` command: ``train``, ``summary``, ``features``, ``predict``, ``eval``, ``compare``, ``weights``."""
from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path
from typing import List, NoReturn, Optional

from mtl.core.errors import UserError, out_of_memory


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one ``mtl: error: ...`` line (no usage block); a missing command lists them."""

    def error(self, message: str) -> NoReturn:
        commands = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is not None and "required" in message and commands.dest in message:
            message = f"{self.prog} needs a command: {', '.join(commands.choices)}"
        self.exit(2, f"mtl: error: {' '.join(message.split())} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mtl", description="Transfer learning experiments from YAML configs.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train from a config (or resume a run)",
                           description="Train from a YAML config; key=value arguments override config keys.")
    train.add_argument("config", nargs="?", help="a config file, e.g. configs/quickstart.yaml or runs/x/<time>/config.yaml")
    train.add_argument("overrides", nargs="*", help="overrides such as optim.lr=0.01 train.epochs=3 model.freeze=all")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")

    summary = sub.add_parser("summary", help="a layer table: output shapes, parameters, trainable or frozen",
                             description="Layers of the model a config (or a run) builds, as torchsummary prints them.")
    summary.add_argument("target", help="a config file or a run directory")
    summary.add_argument("overrides", nargs="*", help="config overrides, e.g. model.freeze=all")
    summary.add_argument("--input", metavar="C,H,W", help="input shape (default 3,<data.image_size>,<data.image_size>)")
    summary.add_argument("--depth", type=int, default=None, help="only modules up to this nesting depth")

    features = sub.add_parser("features", help="save feature-map grids of selected layers for one image",
                              description="Forward hooks on the selected layers; one PNG grid per layer.")
    features.add_argument("target", help="a config file or a run directory (its best checkpoint)")
    features.add_argument("overrides", nargs="*", help="config overrides")
    features.add_argument("--image", required=True, help="an image file")
    features.add_argument("--layers", default="conv", help="conv (every convolution), or comma-separated module names "
                                                            "or glob patterns, e.g. encoder.layer1,encoder.layer4.*")
    features.add_argument("--out", help="output folder (default <run>/features or runs/features/<name>)")
    features.add_argument("--max-maps", type=int, default=64, help="channels shown per layer (default 64)")

    predict = sub.add_parser("predict", help="top-k predictions of a trained run on images or a folder")
    predict.add_argument("run", help="a run directory")
    predict.add_argument("inputs", nargs="+", help="image files or folders")
    predict.add_argument("--topk", type=int, default=3)
    predict.add_argument("--out", help="output folder (default <run>/predictions)")

    evaluate = sub.add_parser("eval", help="metrics and confusion matrix of a run's best checkpoint")
    evaluate.add_argument("run", help="a run directory")
    evaluate.add_argument("--split", default="val", help="which split of the run's data set (default val)")

    compare = sub.add_parser("compare", help="a table of runs' metrics and their delta_m",
                             description="One row per run (or per stage), one column per task metric; with "
                                         "--baseline also delta_m %% against single-task results.")
    compare.add_argument("runs", nargs="+", help="run directories, staged runs, or folders of runs")
    compare.add_argument("--baseline", metavar="FILE", help="single-task results {task: {metric: value}} (YAML)")
    compare.add_argument("--which", choices=("final", "best"), default="final", help="which epoch's metrics (default final)")
    compare.add_argument("--metrics", metavar="M1,M2", help="only these metric names, comma-separated")
    compare.add_argument("--write-baseline", metavar="FILE", help="write the runs' per-task metrics as a baseline file")

    weights = sub.add_parser("weights", help="manage torchvision weight files for offline use")
    wsub = weights.add_subparsers(dest="action", required=True)
    imp = wsub.add_parser("import", help="put a torchvision weights file into torchvision's cache (hash checked)")
    imp.add_argument("file")
    wsub.add_parser("list", help="list the weight files in torchvision's cache")
    for command in (train, summary, features, predict, evaluate):
        command.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                             help="import a module that registers your own encoders, heads, losses, metrics or "
                                  "weighting methods (repeatable; also the config key imports)")
    return parser


# File-system errors that come from the paths a user gave or the machine's state, not from a bug.
_USER_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as ``mtl: warning: ...`` in one line, without the source line Python prints under them."""
    text = " ".join(str(message).split())
    prefix = "mtl: warning:" if issubclass(category, UserWarning) else f"mtl: warning: {category.__name__}:"
    try:
        print(f"{prefix} {text}", file=file if file is not None else sys.stderr)
    except OSError:  # no usable stderr: nothing to report to
        pass


def _os_error_text(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {os.fsdecode(e.filename)}" if e.filename is not None else ""
        return f"no space left on device{where}; free space there or write elsewhere (files written before are intact)"
    path = os.fsdecode(e.filename)
    if e.errno == errno.ENOTDIR:  # name the file that stands where a folder is needed
        blocker = next((p for p in (path, *(str(q) for q in Path(path).parents)) if os.path.isfile(p)), None)
        if blocker is not None:
            return f"{blocker} is a file, but a folder is needed there (for {path}); move it or change the path"
    return f"{e.strerror}: {path}; check that path (in the config or on the command line) and its permissions"


def main(argv: Optional[List[str]] = None) -> int:
    """Entry point; bad input prints one line and returns exit code 2."""
    parser = _parser()
    args, extra = parser.parse_known_args(argv)  # a usage error: one line, then SystemExit(2), as argparse does
    # overrides after an option (`mtl summary cfg.yaml --input 3,64,64 model.freeze=all`) are left over by argparse
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    with warnings.catch_warnings():
        warnings.showwarning = _one_line_warning
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    try:
        if getattr(args, "imports", None):
            from mtl.plugins import import_modules

            import_modules(args.imports)
        if args.command == "train":
            from mtl.core import distributed
            from mtl.workflows.train import resume_run, train_from_file

            distributed.init_from_env()  # under torchrun: join the process group
            if args.resume:
                if args.config or args.overrides:
                    raise UserError("--resume takes only a run directory; the run's own config.yaml is used")
                resume_run(args.resume)
            elif not args.config:
                raise UserError("mtl train needs a config file, e.g. mtl train configs/quickstart.yaml")
            else:
                train_from_file(args.config, args.overrides)
        elif args.command == "summary":
            from mtl.workflows.inspect import summary_command

            print(summary_command(args.target, args.overrides, args.input, args.depth))
        elif args.command == "features":
            from mtl.workflows.inspect import features_command

            paths = features_command(args.target, args.overrides, args.image, args.layers, args.out, args.max_maps)
            print(f"wrote {len(paths)} feature-map grids to {paths[0].parent if paths else args.out}")
        elif args.command == "predict":
            from mtl.workflows.predict import predict_command

            print(predict_command(args.run, args.inputs, args.topk, args.out))
        elif args.command == "eval":
            from mtl.engine.evaluate import eval_command

            print(eval_command(args.run, args.split))
        elif args.command == "compare":
            from mtl.workflows.compare import compare_table, write_baseline

            if args.write_baseline:
                write_baseline(args.runs, args.write_baseline, args.which)
                print(f"wrote {args.write_baseline}")
            else:
                metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
                print(compare_table(args.runs, args.baseline, args.which, metrics))
        elif args.command == "weights":
            from mtl.models.weights import format_cached_table, import_weights, list_cached

            if args.action == "import":
                print(f"imported to {import_weights(args.file)}")
            else:
                print(format_cached_table(list_cached()))
    except UserError as e:
        print(f"mtl: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno not in _USER_ERRNOS or (e.filename is None and e.errno not in (errno.ENOSPC, errno.EDQUOT)):
            raise
        print(f"mtl: error: {_os_error_text(e)}", file=sys.stderr)
        return 2
    except (MemoryError, RuntimeError) as e:  # where the trainer cannot name the phase and batch size
        if not out_of_memory(e):
            raise
        first = next((line for line in str(e).splitlines() if "memory" in line), type(e).__name__).strip()
        print(f"mtl: error: out of memory ({first[:200]}); lower data.batch_size or data.image_size", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, process 0 speaks for all
            print("mtl: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.command == "train":
            from mtl.core import distributed

            distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
