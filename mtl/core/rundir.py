"""Run directories: created atomically, locked by the one process that writes them, cleared of stray temporaries."""

from __future__ import annotations

import fcntl
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Tuple

from mtl.core.checkpoint import NOT_WRITABLE, remove_temporaries, writing
from mtl.core.errors import UserError

LOCK_NAME = ".lock"


def make_run_dir(base: Path) -> Path:
    """Create ``base``, or ``base-1``, ``base-2``, ... if taken: ``os.mkdir`` either creates a directory or fails, so
    two runs started at the same moment never share one, even on a slow network file system."""
    base.parent.mkdir(parents=True, exist_ok=True)
    run_dir, i = base, 1
    while True:
        try:
            os.mkdir(run_dir)
            return run_dir
        except FileExistsError:
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1


class RunLock:
    """An exclusive ``flock`` on ``<run>/.lock``, held while a process writes the run. The operating system drops it
    when that process ends, however it ends (SIGKILL included), so a lock is never left behind."""

    def __init__(self, run_dir: Path, fd: int) -> None:
        self.run_dir, self._fd = run_dir, fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def lock_run_dir(run_dir: Path, wait_s: float = 1.0) -> RunLock:
    """Lock ``run_dir`` for this process, remove stray temporaries of earlier killed writers (nobody else writes
    there now), and record this process in the lock file; a run that another process holds is a UserError."""
    path = run_dir / LOCK_NAME
    with writing(path):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            if e.errno not in NOT_WRITABLE:
                raise
            raise UserError(
                f"cannot write in run directory {run_dir} ({e.strerror.lower()}); make it writable, or copy "
                f"it somewhere writable and resume the copy: mtl train --resume <copy>"
            ) from None
    deadline = time.monotonic() + wait_s  # check_not_in_use() takes the lock for a moment: that is no writer
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(_in_use(run_dir, holder)) from None
            time.sleep(0.05)
        except OSError as e:  # a file system without locks: train unguarded rather than not at all
            warnings.warn(
                f"cannot lock {path} ({e.strerror or e}); nothing stops a second process from writing "
                f"this run at the same time",
                stacklevel=2,
            )
            break
    lock = RunLock(run_dir, fd)
    try:
        with writing(path):
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        for folder in (run_dir, run_dir / "checkpoints"):
            remove_temporaries(folder)
    except BaseException:
        lock.release()
        raise
    return lock


def check_not_in_use(run_dir: Path) -> None:
    """A UserError when another process holds ``run_dir``'s lock (it trains the run); creates and changes nothing."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except OSError:  # no lock file: no process of this mtl writes the run
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(_in_use(run_dir, _holder(fd))) from None
    except OSError:  # a file system without locks: nobody can hold one
        pass
    finally:
        os.close(fd)  # releases the shared lock, if taken


def _holder(fd: int) -> Tuple[str, str]:
    """(pid, host) from the lock file; empty strings when it holds neither."""
    try:
        pid, _, host = os.pread(fd, 256, 0).decode().strip().partition(" ")
    except (OSError, UnicodeDecodeError):
        return "", ""
    return (pid, host) if pid.isdigit() else ("", "")


def _in_use(run_dir: Path, holder: Tuple[str, str]) -> str:
    pid, host = holder
    who = (
        f"process {pid}" + (f" on {host}" if host and host != socket.gethostname() else "")
        if pid
        else "another process"
    )
    return (
        f"{run_dir} is in use: {who} is training it and holds {run_dir / LOCK_NAME}; wait for that run to end, "
        f"or stop it (kill -TERM {pid or '<pid>'}) and then resume it"
    )


def resume_hint(run_dir: Path) -> str:
    """What to run after a fault was fixed: ``--resume`` when the run has a checkpoint, else a fresh start."""
    if (run_dir / "checkpoints" / "last.pt").is_file():
        return f"then continue with mtl train --resume {run_dir}"
    return f"then start it again with mtl train {run_dir / 'config.yaml'}"


def no_checkpoint_yet(run_dir: Path) -> str:
    return (
        f"{run_dir} has no checkpoint yet (killed in its first epoch?), so there is nothing to resume; start it "
        f"again with mtl train {run_dir / 'config.yaml'}"
    )
