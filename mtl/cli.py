"""The ``mtl`` command: ``train``, ``summary``, ``features``, ``predict``, ``eval``, ``compare``, ``lr-find``,
``weights``."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import List, NoReturn, Optional, Sequence

from mtl.core.errors import UserError, out_of_memory
from mtl.core.imports import import_modules


class _Parser(argparse.ArgumentParser):
    """argparse with its errors in one ``mtl: error: ...`` line (no usage block); a missing command lists them."""

    def error(self, message: str) -> NoReturn:
        commands = next((a for a in self._actions if isinstance(a, argparse._SubParsersAction)), None)
        if commands is not None and "required" in message and commands.dest in message:
            message = f"{self.prog} needs a command: {', '.join(commands.choices)}"
        self.exit(2, f"mtl: error: {' '.join(message.split())} (see {self.prog} --help)\n")


# ``mtl <name>`` runs ``mtl.commands.<name>``: add_arguments(parser) and run(args) -> exit code. Only the module of the
# command that runs is imported, so ``mtl --help`` and ``mtl compare`` do not pay for torch's model code.
COMMANDS = [
    ("train", "train from a config (or resume a run)"),
    ("sweep", "train a grid of overrides x seeds, one run each (or resume a sweep)"),
    ("summary", "a layer table: output shapes, parameters, trainable or frozen"),
    ("features", "save feature-map grids of selected layers for one image"),
    ("predict", "top-k predictions of a trained run on images or a folder"),
    ("eval", "metrics and confusion matrix of a run's best checkpoint"),
    ("compare", "a table of runs' metrics and their delta_m"),
    ("lr-find", "the learning-rate range test of a config: a suggested optim.lr"),
    ("weights", "manage torchvision weight files for offline use"),
]


def _command_module(name: str) -> ModuleType:
    return importlib.import_module(f"mtl.commands.{name.replace('-', '_')}")


def _parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser, with the arguments of the command named in ``argv`` (its module imported); the others are listed."""
    parser = _Parser(prog="mtl", description="Transfer learning experiments from YAML configs.")
    sub = parser.add_subparsers(dest="command", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, text in COMMANDS:
        command = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        if name == chosen:
            _command_module(name).add_arguments(command)
    return parser


# File-system errors that come from the paths a user gave or the machine's state, not from a bug.
_USER_ERRNOS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EEXIST,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENOSPC,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}


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
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _parser(argv)
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
            import_modules(args.imports)
        return _command_module(args.command).run(args)
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


if __name__ == "__main__":
    sys.exit(main())
