"""One line when a one-time wait (generating a data set, caching encoder features) lasts, and one when it is over.

Terminal bars are off when the output is no terminal (a log file), so a wait of minutes would otherwise print
nothing there. Once the wait has lasted ``after`` seconds, a line says what is happening; when it ends, a second line
says how long it took. A quick wait prints neither, so that a one-line refusal after it stays one line.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Callable, Iterator

from tqdm import tqdm

ANNOUNCE_AFTER_S = 2.0  # a wait that lasts this long says so


@contextlib.contextmanager
def announced(
    started_text: str, done_text: Callable[[float], str], after: float = ANNOUNCE_AFTER_S, enabled: bool = True
) -> Iterator[None]:
    """Around a wait: ``started_text`` on stderr once it has lasted ``after`` seconds (at once when ``after`` <= 0),
    then, only if that line was printed, ``done_text(seconds)`` when it ends without an error. ``enabled`` False
    (e.g. torchrun's other processes, which wait alike) prints nothing."""
    if not enabled:
        yield
        return
    started, said = time.perf_counter(), threading.Lock()

    def say() -> None:
        if said.acquire(blocking=False):
            tqdm.write(started_text, file=sys.stderr)

    timer = threading.Timer(after, say)
    timer.daemon = True
    if after <= 0:
        say()  # at once, not from the timer's thread
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if not said.acquire(blocking=False):  # the first line was printed: say that the wait is over
        tqdm.write(done_text(time.perf_counter() - started), file=sys.stderr)
