"""Several processes (``torchrun``): process group, rank helpers and the reductions the trainer needs.

Outside ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment) every helper is a no-op for one process.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any, Callable, Iterable, List, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from mtl.core.errors import UserError

T = TypeVar("T")


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group ``torchrun`` describes (NCCL on GPUs, else gloo); False for a single process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=30))
    return True


def local_device() -> torch.device:
    """This process's GPU under torchrun (``LOCAL_RANK``), else the first one."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_mean_(tensors: Iterable[Optional[Tensor]]) -> None:
    """Average tensors across processes in place, with one flat all-reduce per dtype."""
    if world_size() == 1:
        return
    by_dtype: dict = {}
    for t in tensors:
        if t is not None:
            by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat /= world_size()
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_reduce_sum(t: Tensor) -> Tensor:
    """The sum of ``t`` over processes (a new tensor)."""
    if world_size() == 1:
        return t
    out = t.clone()
    dist.all_reduce(out)
    return out


def global_mean(t: Tensor) -> Tensor:
    """``t`` whose value is the mean over processes and whose gradient flows to this process's ``t``."""
    if world_size() == 1:
        return t
    mean = all_reduce_sum(t.detach()) / world_size()
    return t + (mean - t.detach())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` on every process."""
    if world_size() == 1:
        return obj
    box: List[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> Optional[T]:
    """``fn()`` on process 0 only (None elsewhere). Its UserError or OSError is raised on every process, so that
    none waits for the others in a later collective."""
    if world_size() == 1:
        return fn()
    error, result = None, None
    if is_main():
        try:
            result = fn()
        except (UserError, OSError) as e:
            error = e
    text = broadcast_object(None if error is None else str(error))
    if error is not None:
        raise error
    if text is not None:
        raise UserError(f"process 0 stopped: {text}")
    return result


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
