"""Atomic, safe checkpoint and JSON writes; safe loads."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickletools
import random
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

import numpy as np
import torch

from mtl.core.errors import UserError

TEMP_SUFFIX = ".mtl-tmp"  # atomic_write's temporaries: .<name>.<random>.mtl-tmp beside the file they replace
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)
Hint = Union[str, Callable[[], str]]


@contextlib.contextmanager
def writing(path: str | Path, then: Hint = "") -> Iterator[None]:
    """Turn a full disk or a read-only place met while writing ``path`` into one UserError line.

    ``then`` (text, or a function that returns it, called only on failure) says what to do once that is fixed.
    """
    try:
        yield
    except UserError:
        raise
    except Exception as err:
        e = _disk_error(err)
        if e is None:
            raise
        then = then() if callable(then) else then
        then = f"; {then}" if then else ""
        if e.errno in NO_SPACE:
            raise UserError(
                f"no space left on device writing {path}; free space there or write elsewhere{then} "
                f"(files written before are intact)"
            ) from None
        raise UserError(
            f"cannot write {e.filename or path}: {(e.strerror or 'not writable').lower()}; make that "
            f"folder writable or write elsewhere{then}"
        ) from None


def _disk_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The full-disk or read-only OSError behind ``err``: itself, or one it was raised while handling (torch.save
    turns a failed write into a RuntimeError when it then cannot finish the zip archive)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno in NO_SPACE + NOT_WRITABLE:
            return err
        seen.add(id(err))
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return None


def _umask() -> int:
    """The process's umask: from /proc on Linux (reading it with ``os.umask`` would set it for a moment, for every
    thread), else set and put back at once."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_plain_mode(path: str | Path) -> None:
    """Give ``path`` the permissions a plain ``open`` would have created it with (0666 less the umask), for files
    written as a temporary (``tempfile.mkstemp`` makes them private, 0600) and then renamed into place."""
    os.chmod(path, 0o666 & ~_umask())


def atomic_write(path: str | Path, write: Callable[[str], Any], then: Hint = "") -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: a crash never leaves a truncated file, and a full disk
    is one UserError line (see ``writing``) that leaves the previous file as it was. The file gets the permissions
    a plain ``open`` would give it (0666 less the umask: usually readable by the user's group), not the private
    0600 of a temporary file."""
    path = Path(path)
    with writing(path, then):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        os.close(fd)
        try:
            write(tmp)
            give_plain_mode(tmp)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def remove_temporaries(folder: str | Path) -> List[Path]:
    """Delete the temporaries that ``atomic_write`` left in ``folder`` when its process was killed (SIGKILL, power
    loss); returns them. Call it only while no other process writes there (see ``rundir.lock_run_dir``)."""
    found = sorted(Path(folder).glob(f".*{TEMP_SUFFIX}")) if Path(folder).is_dir() else []
    for p in found:
        p.unlink(missing_ok=True)
    return found


def _save_torch(obj: Any, tmp: str) -> None:
    with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError (ENOSPC), not a bare RuntimeError
        torch.save(obj, f)


def save_checkpoint(obj: Dict[str, Any], path: str | Path, then: Hint = "") -> None:
    atomic_write(path, lambda tmp: _save_torch(obj, tmp), then)


def save_json(obj: Any, path: str | Path, then: Hint = "") -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2) + "\n"), then)


def load_checkpoint(path: str | Path) -> Dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; unreadable files are a UserError."""
    path = Path(path)
    obj = load_torch_file(path, "checkpoint")
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj


def load_torch_file(path: str | Path, what: str = "checkpoint", dir_hint: str = "") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; every way it can fail is one clear UserError line."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except (FileNotFoundError, NotADirectoryError):
        raise UserError(f"{what} file {path} does not exist") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory, not a file{dir_hint}") from None
    except OSError as e:
        raise UserError(f"could not read {what} file {path}: {e.strerror or e}") from None
    if not head:
        raise UserError(f"could not read {what} file {path}: it is empty (0 bytes); write it again with torch.save")
    try:
        with warnings.catch_warnings():  # torch's note on pickle protocols other than 2: the files load, or fail below
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError as e:
        raise UserError(f"could not read {what} file {path}: {e.strerror or e}") from None
    except Exception as e:  # pickle errors, truncated zips, foreign formats: many types
        raise UserError(f"could not read {what} file {path}: {_load_problem(e, head)}") from None


_PICKLE_OPCODES = {ord(op.code): op.name for op in pickletools.opcodes}


def _load_problem(err: Exception, head: bytes) -> str:
    """Why torch.load failed, in words, without torch's multi-line advice to turn safe loading off."""
    text = " ".join(str(err).split())
    # torch words a refused global two ways: "Unsupported global: GLOBAL x.Y ..." and "unsupported GLOBAL x.y whose ..."
    refused = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", text, re.IGNORECASE)
    if refused:
        return (
            f"it holds a pickled Python object ({refused.group(1)}) that safe loading (weights_only) refuses; "
            f"save a state dict instead: torch.save(model.state_dict(), path)"
        )
    operand = re.search(r"Unsupported operand (\d+)", text)
    opcode = _PICKLE_OPCODES.get(int(operand.group(1))) if operand else None
    if opcode:  # a real pickle instruction that safe loading does not allow (an unknown byte is damage, below)
        return (
            f"it holds a pickled Python object that safe loading (weights_only) refuses (pickle instruction "
            f"{opcode}, which torch.save does not write); save a state dict instead: "
            f"torch.save(model.state_dict(), path)"
        )
    if not head.startswith((b"PK", b"\x80")):  # torch.save writes a zip archive; old files are a pickle
        return "it is not a PyTorch file (torch.save writes a zip archive); give a file written by torch.save"
    unpickler = re.search(r"WeightsUnpickler error: (.+?)(?: Check the documentation|$)", text)
    reason = (unpickler.group(1) if unpickler else re.split(r"(?<=[a-z)])\. ", text, maxsplit=1)[0]).rstrip(".")
    reason = reason or type(err).__name__
    return f"it is damaged or truncated ({reason[:160]}); copy or save it again"


def rng_state() -> Dict[str, Any]:
    """Python, NumPy, torch (and CUDA) RNG states, in a form ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
