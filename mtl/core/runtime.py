"""Run-time choices every layer needs: seeding, the device, bf16 autocast, eval mode for a block, and the stop
signals (Ctrl-C, SIGTERM) that loader workers leave to the main process."""

from __future__ import annotations

import contextlib
import os
import random
import resource
import signal
from contextlib import contextmanager
from typing import Any, Dict, Iterator

import numpy as np
import torch
from torch import nn

from mtl.core import distributed as dist
from mtl.core.errors import UserError


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch; optionally make torch use deterministic kernels only."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def select_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return dist.local_device() if dist.world_size() > 1 else torch.device("cuda")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device is {name!r} but no CUDA GPU is available; use train.device=auto or cpu")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(
            f"train.device is {name!r} but this machine has {torch.cuda.device_count()} CUDA GPU(s), "
            f"numbered from 0; use cuda:0 ... or train.device=auto"
        )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(
            "train.device is 'mps' but no Apple-silicon GPU (MPS) is available; use train.device=auto or cpu"
        )
    return device


def use_amp(mode: str, device: torch.device) -> bool:
    if mode == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return mode == "bf16"


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM held back in this thread during the block (they arrive when it ends). Processes forked in
    it (DataLoader workers) start with them blocked, until ``ignore_stop_signals`` runs there."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """``worker_init_fn`` of DataLoader workers: Ctrl-C and SIGTERM to the whole process group (what a terminal and a
    scheduler send) leave them running, so that the main process can finish its step and save a checkpoint; they
    end with it. A signal held back since the fork (``stop_signals_blocked``) is dropped."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)  # also replaces torch's worker handler, which dies on a foreign SIGTERM
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


# ---------------------------------------------------------------------------------------------------- memory
def memory_mark(device: torch.device) -> float:
    """Start measuring training memory on ``device``: resets CUDA's peak; on the CPU, resets the process's resident
    high-water mark where Linux allows it (``/proc/self/clear_refs``) and returns the resident memory now (MiB),
    else returns the high-water mark so far (then an earlier, higher peak hides what training needs)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0.0
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_mib("VmRSS")
    except (OSError, ValueError):
        return _peak_rss_mib()


def training_memory(device: torch.device, mark: float) -> Dict[str, Any]:
    """``{"peak_mib", "measure"}`` since :func:`memory_mark`: CUDA's peak allocated memory, or on the CPU how far
    the process's peak resident memory rose above the mark (what training needed beyond the model and data loaded
    before)."""
    if device.type == "cuda":
        return {"peak_mib": torch.cuda.max_memory_allocated(device) / 2**20, "measure": "peak CUDA memory allocated"}
    grown = max(_peak_rss_mib() - mark, 0.0)
    return {
        "peak_mib": grown,
        "measure": "the process's peak resident memory while training and validating, above its resident memory "
        "before (Linux: the high-water mark reset at the start)",
    }


def _peak_rss_mib() -> float:
    """The resident high-water mark (``VmHWM``, which ``memory_mark`` may reset), else ``ru_maxrss`` (never reset)."""
    try:
        return _proc_status_mib("VmHWM")
    except (OSError, ValueError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _proc_status_mib(key: str) -> float:
    """A ``kB`` line of ``/proc/self/status`` in MiB; ValueError when it is not there."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {key} in /proc/self/status")


# ---------------------------------------------------------------------------------------------------- helpers
@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad; restores every module's own training flag afterwards (pre-order, through the
    module's own ``train`` where it overrides it, so traced dual-graph encoders switch their graph back)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, mode in modes:  # parents before children: a parent's train() is corrected by its children after
            if type(m).train is not nn.Module.train:
                m.train(mode)
            else:
                m.training = mode
